"""Logging a model skips MLflow's requirement check (its installed-package map), and only then.

Runs in a fresh interpreter: MLflow builds the map once per process, so a check made by an
earlier test in this one would hide whether the skip works.
"""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import BIN

_SCRIPT = r"""
import json, sys
import numpy as np, torch, mlflow, mlflow.pytorch
import mlflow.utils.environment as environment
import mlflow.utils.requirements_utils as requirements_utils
from mlflow.artifacts import download_artifacts
from fowlflow.tracking import RunTracker

model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten()).eval()
example = np.zeros((2, 3, 8, 8), dtype=np.float32)
check = environment.warn_dependency_requirement_mismatches
tracker = RunTracker()
tracker.start()
uri = tracker.log_model(model, example, {"class_names": ["a", "b"]})
out = {"map_after_fowlflow": requirements_utils._MODULES_TO_PACKAGES is not None,
       "check_restored": environment.warn_dependency_requirement_mismatches is check,
       "requirements": open(download_artifacts(uri, dst_path="model") + "/requirements.txt")
       .read().split()}
tracker.finish()
with mlflow.start_run():  # the same call without fowlflow: MLflow builds the map
    mlflow.pytorch.log_model(model, name="model", serialization_format="pt2",
                             input_example=example,
                             pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                             validate_serving_input=False)
out["map_after_mlflow"] = requirements_utils._MODULES_TO_PACKAGES is not None
print(json.dumps(out))
"""


def test_model_logging_skips_the_installed_package_scan_and_keeps_the_requirements(tmp_path):
    from importlib.metadata import version

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    proc = subprocess.run([str(BIN / "python"), "-c", _SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["map_after_fowlflow"] is False, out
    assert out["check_restored"] is True, out
    assert f"torch=={version('torch')}" in out["requirements"], out
    assert f"mlflow=={version('mlflow')}" in out["requirements"], out
    # the skip is what kept the map unbuilt: MLflow's own call builds it
    assert out["map_after_mlflow"] is True, out
