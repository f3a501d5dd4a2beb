"""Move alias ``champion`` to a candidate version, for the PyTorch and the ONNX model together.

    mlflow run . -e promote -P name=fowl-classifier                        # the @candidate
    mlflow run . -e promote -P name=fowl-classifier-onnx                   # the same pair
    mlflow run . -e promote -P version=7 -P policy=min_accuracy -P threshold=0.9
    mlflow run . -e promote -P version=5 -P policy=manual                  # roll back

    decision = promote("fowl-classifier")       # raises RegistryError when refused

Policies (``threshold`` in accuracy units, e.g. 0.01 = one point):
  * ``no_regression`` (default): val accuracy >= the current champion's + threshold
    (threshold 0: at least as good; 0.01: one point better; -0.005: tolerate half a point).
    With no champion yet, any candidate with a val accuracy is accepted.
  * ``min_accuracy``: val accuracy >= threshold, whatever the champion.
  * ``manual``: no accuracy check (rollbacks, hand-picked versions).
Every policy requires that the version passed the ONNX parity check and has its ONNX twin,
because ``models:/<name>@champion`` and ``models:/<name>-onnx@champion`` must be the same model.
The replaced champion gets alias ``previous_champion`` (in both models) for a quick rollback.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from enum import Enum

from fowlflow.errors import RegistryError
from fowlflow.registry._cli import given
from fowlflow.registry.card import PAIRED_ONNX, PAIRED_PYTORCH
from fowlflow.registry.register import CANDIDATE, DEFAULT_NAME

logger = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous_champion"


class Policy(str, Enum):
    NO_REGRESSION = "no_regression"
    MIN_ACCURACY = "min_accuracy"
    MANUAL = "manual"


@dataclass(frozen=True)
class Decision:
    """Whether a version may become champion, and why."""

    accepted: bool
    reason: str


def _acc(tags: dict[str, str]) -> float | None:
    try:
        return float(tags["val_acc"])
    except (KeyError, ValueError):
        return None


def decide(candidate: dict[str, str], champion: dict[str, str] | None, policy: Policy,
           threshold: float = 0.0) -> Decision:
    """Apply ``policy`` to a candidate's and the current champion's version tags (pure)."""
    if candidate.get("parity_passed") != "true":
        return Decision(False, "its ONNX parity check did not pass (tag parity_passed="
                               f"{candidate.get('parity_passed', 'missing')!r}); re-register it "
                               "with `mlflow run . -e register`")
    if "/" not in candidate.get(PAIRED_ONNX, ""):
        return Decision(False, "it has no registered ONNX version (tag onnx_model="
                               f"{candidate.get(PAIRED_ONNX, 'missing')!r})")
    if policy is Policy.MANUAL:
        return Decision(True, "policy manual: accuracy not compared")
    acc = _acc(candidate)
    if acc is None:
        return Decision(False, "it has no val_acc tag; promote with -P policy=manual if you "
                               "trust it anyway")
    if policy is Policy.MIN_ACCURACY:
        ok = acc >= threshold
        return Decision(ok, f"val_acc {acc:.4f} {'>=' if ok else '<'} threshold {threshold:.4f}")
    if champion is None:
        return Decision(True, f"no current champion; val_acc {acc:.4f}")
    champ = _acc(champion)
    if champ is None:
        return Decision(True, f"the champion has no val_acc; candidate val_acc {acc:.4f}")
    need = champ + threshold
    ok = acc >= need
    return Decision(ok, f"val_acc {acc:.4f} {'>=' if ok else '<'} champion's {champ:.4f}"
                        + (f" + threshold {threshold:+.4f}" if threshold else ""))


def promote(name: str = DEFAULT_NAME, version: str | None = None,
            policy: Policy | str = Policy.NO_REGRESSION, threshold: float = 0.0) -> Decision:
    """Point ``champion`` at ``version`` (default: the ``candidate``) of ``name`` and its ONNX twin.

    ``version`` is a version number or an alias (``candidate``, ``previous_champion``…). ``name``
    may also be the ``<name>-onnx`` model: its version is promoted together with its PyTorch
    twin, exactly as if the twin had been named.

    Returns:
        The accepted :class:`Decision` (also when the version already is the champion).

    Raises:
        RegistryError: the promotion is refused (the message says why) or a version is missing.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    policy = _policy(policy)
    client = mlflow.MlflowClient()
    version = str(version or CANDIDATE).lstrip("@")
    try:
        mv = (client.get_model_version(name, version) if version.isdigit()
              else client.get_model_version_by_alias(name, version))
    except MlflowException as exc:
        which = f"version {version}" if version.isdigit() else f"alias @{version}"
        raise RegistryError(f"promote: {name!r} has no {which} ({exc.message}); register a "
                            "model first or give -P version=<n>") from exc
    if PAIRED_PYTORCH in mv.tags:  # an ONNX version: the pair is promoted through its PyTorch twin
        twin_name, twin_version = mv.tags[PAIRED_PYTORCH].rsplit("/", 1)
        logger.info("%s/%s is the ONNX twin of %s/%s; promoting the pair through %s", name,
                    mv.version, twin_name, twin_version, twin_name)
        name, mv = twin_name, client.get_model_version(twin_name, twin_version)
    champion = _by_alias(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(mv.version):
        return Decision(True, f"{name}/{mv.version} already is the champion")
    decision = decide(mv.tags, champion.tags if champion else None, policy, threshold)
    if not decision.accepted:
        raise RegistryError(f"promotion of {name} version {mv.version} refused: {decision.reason}"
                            f" (policy {policy.value}).")
    onnx_name, onnx_version = mv.tags[PAIRED_ONNX].rsplit("/", 1)
    twin = client.get_model_version(onnx_name, onnx_version)
    if twin.tags.get(PAIRED_PYTORCH) != f"{name}/{mv.version}":
        raise RegistryError(f"promotion refused: {onnx_name}/{onnx_version} does not point back "
                            f"at {name}/{mv.version} (its pytorch_model tag is "
                            f"{twin.tags.get(PAIRED_PYTORCH)!r}); re-register the model")
    # Check everything first, then move both aliases back to back.
    old_twin = _by_alias(client, onnx_name, CHAMPION)
    for model_name, new, old in ((onnx_name, onnx_version, old_twin),
                                 (name, mv.version, champion)):
        if old is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, old.version)
        client.set_registered_model_alias(model_name, CHAMPION, new)
        client.set_model_version_tag(model_name, new, "promotion",
                                     f"{policy.value}: {decision.reason}")
    logger.info("champion: %s/%s and %s/%s (%s)", name, mv.version, onnx_name, onnx_version,
                decision.reason)
    return decision


def _by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _policy(value: Policy | str) -> Policy:
    try:
        return Policy(value)
    except ValueError:
        raise RegistryError(f"unknown promotion policy {value!r}; use one of "
                            f"{[p.value for p in Policy]}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fowlflow.registry.promote",
                                description="Move alias 'champion' (PyTorch + ONNX models).")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--version", default=CANDIDATE,
                   help="version number or alias to promote (default: candidate)")
    p.add_argument("--policy", default=Policy.NO_REGRESSION.value,
                   choices=[x.value for x in Policy])
    p.add_argument("--threshold", type=float, default=0.0)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    import mlflow

    args = build_parser().parse_args(argv)
    # Record the decision in the project run when launched by `mlflow run`; a plain
    # `python -m` call creates no run.
    run = mlflow.start_run() if os.environ.get("MLFLOW_RUN_ID") else None
    try:
        decision = promote(args.name, given(args.version), args.policy, args.threshold)
    except RegistryError as exc:
        if run:
            mlflow.set_tag("promotion", f"refused: {exc.message}")
            mlflow.end_run("FAILED")
        raise
    if run:
        mlflow.set_tag("promotion", f"accepted: {decision.reason}")
        mlflow.end_run()
    print(f"promoted: {decision.reason}")
    return 0


if __name__ == "__main__":
    import sys

    from fowlflow.errors import exit_code
    from fowlflow.registry._cli import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sys.exit(exit_code(main))
