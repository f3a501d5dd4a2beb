"""Promotion: the policy (pure) and moving both models' aliases in a real registry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fowlflow.errors import RegistryError
from fowlflow.registry.promote import Policy, decide
from tests.conftest import ROOT
from tests.registry.conftest import MODEL_NAME, log_contract_model

OK = {"parity_passed": "true", "onnx_model": "m-onnx/1", "val_acc": "0.80"}


@pytest.mark.parametrize("candidate, champion, policy, threshold, accepted, reason", [
    (OK, None, Policy.NO_REGRESSION, 0.0, True, "no current champion"),
    (OK, {"val_acc": "0.80"}, Policy.NO_REGRESSION, 0.0, True, ">= champion's 0.8000"),
    (OK, {"val_acc": "0.81"}, Policy.NO_REGRESSION, 0.0, False, "< champion's 0.8100"),
    (OK, {"val_acc": "0.75"}, Policy.NO_REGRESSION, 0.1, False, "threshold +0.1000"),
    (OK, {"val_acc": "0.82"}, Policy.NO_REGRESSION, -0.05, True, ">= champion's"),
    (OK, {"val_acc": "0.99"}, Policy.MIN_ACCURACY, 0.8, True, ">= threshold 0.8000"),
    (OK, None, Policy.MIN_ACCURACY, 0.9, False, "< threshold 0.9000"),
    ({**OK, "parity_passed": "false"}, None, Policy.MANUAL, 0, False, "parity check did not"),
    ({**OK, "onnx_model": "none: parity failed"}, None, Policy.MANUAL, 0, False, "no registered ONNX"),
    ({**OK, "val_acc": ""}, None, Policy.NO_REGRESSION, 0, False, "no val_acc"),
    ({**OK, "val_acc": "0.1"}, {"val_acc": "0.9"}, Policy.MANUAL, 0, True, "manual"),
])
def test_policy(candidate, champion, policy, threshold, accepted, reason):
    decision = decide(candidate, champion, policy, threshold)
    assert decision.accepted is accepted and reason in decision.reason


def _aliases(client, name):
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_promotion_accepted_then_refused_then_by_min_accuracy(registered, use_store, val_dir):
    import mlflow

    from fowlflow.registry import register_trained_model
    from fowlflow.registry.promote import promote

    client = mlflow.MlflowClient(use_store)
    onnx = MODEL_NAME + "-onnx"
    first = promote(MODEL_NAME)  # @candidate = the first version; no champion yet
    assert first.accepted and "no current champion" in first.reason
    assert _aliases(client, MODEL_NAME)["champion"] == registered.version
    assert _aliases(client, onnx)["champion"] == registered.onnx_version

    worse = register_trained_model(run_id=log_contract_model(val_acc=0.5, seed=1),
                                   name=MODEL_NAME, val_dir=val_dir)
    assert _aliases(client, MODEL_NAME)["candidate"] == worse.version
    with pytest.raises(RegistryError, match=r"refused: val_acc 0.5000 < champion's 0.7500"):
        promote(MODEL_NAME)
    assert _aliases(client, MODEL_NAME)["champion"] == registered.version  # nothing moved
    assert _aliases(client, onnx)["champion"] == registered.onnx_version

    # The same refusal through the entry point's module: non-zero exit, reason on stderr.
    env = {**os.environ, "MLFLOW_TRACKING_URI": use_store}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "fowlflow.registry.promote", "--name",
                           MODEL_NAME], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refused: val_acc 0.5000 < champion's 0.7500" in proc.stderr

    ok = promote(MODEL_NAME, policy="min_accuracy", threshold=0.4)
    assert ok.accepted
    for name, new, old in ((MODEL_NAME, worse.version, registered.version),
                           (onnx, worse.onnx_version, registered.onnx_version)):
        aliases = _aliases(client, name)
        assert (aliases["champion"], aliases["previous_champion"]) == (new, old)
        assert "min_accuracy" in client.get_model_version(name, new).tags["promotion"]

    # Roll back by hand so the serving tests get the first model again, naming the ONNX model
    # (issue 8.12: that was refused with "it has no registered ONNX version").
    back = promote(onnx, version=registered.onnx_version, policy="manual")
    assert back.accepted and back.reason == "policy manual: accuracy not compared"
    assert _aliases(client, onnx)["champion"] == registered.onnx_version
    assert _aliases(client, MODEL_NAME)["champion"] == registered.version
    again = promote(onnx, version="champion")  # an alias works as the version, too
    assert again.reason == f"{MODEL_NAME}/{registered.version} already is the champion"


def test_unknown_policy_and_missing_version_say_what_to_do(registered, use_store):
    from fowlflow.registry.promote import promote

    with pytest.raises(RegistryError, match="unknown promotion policy 'best'"):
        promote(MODEL_NAME, policy="best")
    with pytest.raises(RegistryError, match="has no version 99"):
        promote(MODEL_NAME, version="99")
