"""Register a trained model: PyTorch version, ONNX export, parity check, ONNX version, aliases.

The training entry point (``python -m fowlflow.train``, the MLproject's ``main``) calls, at
the end of a run with ``registered_model_name`` set, under that same run::

    from fowlflow.registry import register_trained_model
    register_trained_model(run_id=run_id, name="fowl-classifier", val_dir=Path("data/val"))

and the MLproject entry point does the same for any logged model::

    mlflow run . -e register -P model_uri=runs:/<run_id>/model [-P val_dir=data/val]

Steps: load the logged PyTorch model → wrap it as a raw-pixel classifier and export ONNX →
run both on real validation images → register the PyTorch model as a version of ``<name>`` →
if parity passed, log the ONNX model (``onnx`` + image ``python_function`` flavors) and
register it as a version of ``<name>-onnx`` → link the two versions by tags, write model cards,
point alias ``candidate`` at both. On a parity failure nothing is registered for ONNX, the
PyTorch version says so in its tags, and :class:`~fowlflow.errors.RegistryError` is raised.
Registering a model that already is a version (with its ONNX twin) returns that version and
registers nothing new.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from fowlflow.data.images import Preprocessing
from fowlflow.data.sources import resolve_data
from fowlflow.errors import RegistryError
from fowlflow.local_paths import find_local
from fowlflow.registry._cli import given, log_params
from fowlflow.registry.card import PAIRED_ONNX, VersionFacts, model_card, version_tags
from fowlflow.registry.parity import DEFAULT_ATOL, DEFAULT_MAX_IMAGES, ParityReport

logger = logging.getLogger(__name__)

DEFAULT_NAME = "fowl-classifier"
ONNX_SUFFIX = "-onnx"
CANDIDATE = "candidate"
ONNX_ARTIFACT = "onnx_model"


@dataclass(frozen=True)
class Registration:
    """The versions one registration created."""

    name: str
    version: str
    onnx_name: str
    onnx_version: str | None
    parity: ParityReport
    reused: bool = False  # the versions already held this model; nothing new was registered


def onnx_name_for(name: str) -> str:
    """The registered model that holds ``name``'s ONNX versions."""
    return name + ONNX_SUFFIX


def register_trained_model(run_id: str, name: str, val_dir: str | Path, *,
                           atol: float = DEFAULT_ATOL, max_images: int = DEFAULT_MAX_IMAGES,
                           opset: int | None = None) -> Registration:
    """Register the model a training run logged at artifact name ``model``.

    The ONNX model, parity metrics and ``registry/parity.json`` are logged to that same run.

    Args:
        run_id: the training run (may still be active).
        name: registered model name; ONNX versions go to ``<name>-onnx``.
        val_dir: a folder of validation images (the ImageFolder's ``val/``).
        atol: largest allowed absolute difference of class probabilities.
        max_images: how many validation images the parity check uses at most.
        opset: ONNX opset (default :data:`fowlflow.registry.export.DEFAULT_OPSET`).

    Returns:
        The :class:`Registration`.

    Raises:
        RegistryError: loading, export or registration failed, or parity failed (then the
            PyTorch version exists, tagged ``parity_passed=false``, and no ONNX version does).
    """
    return register_model_uri(f"runs:/{run_id}/model", name, val_dir, log_run_id=run_id,
                              atol=atol, max_images=max_images, opset=opset)


def register_model_uri(model_uri: str, name: str, val_dir: str | Path | None = None, *,
                       log_run_id: str | None = None, atol: float = DEFAULT_ATOL,
                       max_images: int = DEFAULT_MAX_IMAGES,
                       opset: int | None = None) -> Registration:
    """Register any fowlflow PyTorch model URI; see :func:`register_trained_model`.

    Args:
        model_uri: ``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/m-<id>``…
        log_run_id: the run that receives the ONNX model and parity figures (default: the
            model's source run).
        val_dir: a folder of validation images (a relative one is relative to the folder the
            command was typed in, see :mod:`fowlflow.local_paths`); default: the ``val/``
            folder of the data the model was trained on (its ``data_uri`` metadata, resolved
            like the trainer does).
        name, atol, max_images, opset: as for :func:`register_trained_model`.

    Returns:
        The :class:`Registration`. When this logged model already is a version of ``name``
        with its ONNX twin, those versions, with ``reused=True``: nothing is registered,
        tagged or moved (registration is idempotent).
    """
    import mlflow

    from fowlflow.registry.export import DEFAULT_OPSET, load_pytorch

    client = mlflow.MlflowClient()
    info = _model_info(model_uri)
    source_run_id = info.run_id or ""
    # Register the logged model itself (runs:/ URIs resolve to it, with a warning).
    register_uri = f"models:/{info.model_id}" if getattr(info, "model_id", None) else model_uri
    existing = _already_registered(client, name, register_uri, source_run_id)
    if existing is not None:
        return existing
    module, metadata = load_pytorch(model_uri)
    log_run_id = log_run_id or source_run_id
    if not log_run_id:
        raise RegistryError(f"{model_uri!r} belongs to no run, so there is nowhere to log its "
                            "ONNX model; run the register entry point with `mlflow run`")
    prep = Preprocessing.from_metadata(metadata)
    with (nullcontext(find_local(str(val_dir), "register: val_dir", RegistryError,
                                 "Give the ImageFolder's val/ folder (-P val_dir=...)."))
          if val_dir else training_val_dir(metadata, model_uri)) as val:
        proto, report = _export_and_check(module, prep, val, opset or DEFAULT_OPSET, atol,
                                          max_images, client, log_run_id, model_uri)
    facts = _version_facts(metadata, prep, report, proto, opset or DEFAULT_OPSET, client,
                           source_run_id, model_uri)
    version = _register(client, register_uri, name, facts, "pytorch")
    _refuse_unpaired(client, name, version, report)
    return _register_onnx(client, proto, facts, name, version, log_run_id)


def _export_and_check(module, prep: Preprocessing, val_dir: Path, opset: int, atol: float,
                      max_images: int, client, log_run_id: str, model_uri: str):
    """Export ONNX and compare it with PyTorch on real images; returns ``(proto, report)``.

    A failed export gives ``proto=None`` and a report that says so: the PyTorch model is
    still registered, marked unpromotable. Parity metrics go to ``log_run_id``.
    """
    from fowlflow.registry.export import PixelClassifier, export_onnx
    from fowlflow.registry.parity import check_parity, load_parity_images

    pixels, paths = load_parity_images(val_dir, prep, max_images)
    classifier = PixelClassifier(module, prep)
    with tempfile.TemporaryDirectory(prefix="fowlflow-onnx-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        try:
            proto = export_onnx(classifier, onnx_path, prep, opset=opset)
        except RegistryError as exc:
            return None, ParityReport.export_failed(exc.message, atol)
        report = check_parity(classifier, onnx_path, pixels, atol)
        _log_parity(client, log_run_id, report, paths, model_uri)
    return proto, report


def _version_facts(metadata: dict, prep: Preprocessing, report: ParityReport, proto,
                   opset: int, client, source_run_id: str, model_uri: str) -> VersionFacts:
    """What the tags and model cards of both versions say."""
    import onnx
    import onnxruntime
    import torch

    return VersionFacts(
        source_run_id=source_run_id, model_uri=model_uri,
        class_names=[str(c) for c in metadata["class_names"]], prep=prep,
        val_acc=_val_acc(metadata, client, source_run_id), parity=report, metadata=metadata,
        versions={"torch": str(torch.__version__), "onnx": str(onnx.__version__),
                  "onnxruntime": str(onnxruntime.__version__),
                  "opset": str(_opset(proto) if proto is not None else opset)},
    )


def _refuse_unpaired(client, name: str, version: str, report: ParityReport) -> None:
    """Raise when the export or the parity check failed: the PyTorch version stays, tagged."""
    onnx_name = onnx_name_for(name)
    if report.error:
        client.set_model_version_tag(name, version, PAIRED_ONNX, "none: export failed")
        raise RegistryError(f"{name} version {version} is registered, but {report.error}; "
                            f"nothing was registered under {onnx_name!r} and this version can't "
                            "be promoted.")
    if not report.passed:
        client.set_model_version_tag(name, version, PAIRED_ONNX, "none: parity failed")
        raise RegistryError(
            f"{name} version {version} is registered, but its ONNX export is not: "
            f"{report.summary()}. The exported graph computes something else than the PyTorch "
            f"model; nothing was registered under {onnx_name!r} and this version can't be "
            "promoted. Fix: try another -P opset=..., or report the arch and torch version; "
            "raise -P atol=... only if you accept the difference.")


def _register_onnx(client, proto, facts: VersionFacts, name: str, version: str,
                   log_run_id: str) -> Registration:
    """Log and register the ONNX twin, link the pair, write the cards, move ``candidate``."""
    onnx_name = onnx_name_for(name)
    onnx_info = _log_onnx(proto, facts, log_run_id)
    onnx_version = _register(client, onnx_info.model_uri, onnx_name, facts, "onnx",
                             paired=f"{name}/{version}")
    paired = f"{onnx_name}/{onnx_version}"
    client.set_model_version_tag(name, version, PAIRED_ONNX, paired)
    client.update_model_version(name, version, description=model_card(facts, "pytorch", paired))
    for model_name, v in ((name, version), (onnx_name, onnx_version)):
        client.set_registered_model_alias(model_name, CANDIDATE, v)
    logger.info("registered %s/%s and %s/%s; alias %r points at both", name, version,
                onnx_name, onnx_version, CANDIDATE)
    return Registration(name, version, onnx_name, onnx_version, facts.parity)


def _model_info(model_uri: str):
    import mlflow

    try:
        return mlflow.models.get_model_info(model_uri)
    except Exception as exc:  # MlflowException, OSError: the URI names no logged model
        raise RegistryError(f"register: can't find a model at {model_uri!r} ({exc}); give "
                            "runs:/<run_id>/model of a fowlflow training run, or "
                            "models:/<name>/<version>") from exc


def _already_registered(client, name: str, register_uri: str,
                        run_id: str) -> Registration | None:
    """The complete pair (``name`` + its ONNX twin) already registered from this very model.

    Registration is idempotent: registering the same run's model again returns these versions
    (``reused=True``) and registers, tags and moves nothing. A version without an ONNX twin
    (parity or export failed) is not reused: registering again retries the export.
    """
    query = f"name='{name}'" + (f" and run_id='{run_id}'" if run_id else "")
    for mv in sorted(client.search_model_versions(query), key=lambda v: int(v.version)):
        paired = mv.tags.get(PAIRED_ONNX, "")
        if mv.source != register_uri or "/" not in paired:
            continue
        onnx_name, onnx_version = paired.rsplit("/", 1)
        logger.info("%s version %s and %s version %s already hold %s (run %s); nothing new "
                    "registered", name, mv.version, onnx_name, onnx_version, register_uri, run_id)
        return Registration(name, str(mv.version), onnx_name, onnx_version,
                            ParityReport.from_tags(mv.tags), reused=True)
    return None


@contextmanager
def training_val_dir(metadata: dict, model_uri: str) -> Iterator[Path]:
    """A context giving the validation images of the data the model was trained on (its
    ``data_uri`` metadata): the ImageFolder's ``val/``, or a shard set's ``val`` split written
    into a temporary folder while the context runs.

    Resolved by :func:`fowlflow.data.sources.resolve_data`, as the trainer resolved it
    (downloads are cached), so ``register`` needs no ``val_dir`` for models trained on a
    reachable source.

    Raises:
        RegistryError: the model has no ``data_uri``, or the data has no ``val/`` folder.
    """
    uri = str(metadata.get("data_uri") or "")
    if not uri:
        raise RegistryError(f"{model_uri!r} has no data_uri in its metadata, so its validation "
                            "images are unknown; pass -P val_dir=<ImageFolder>/val")
    with resolve_data(uri, allow_shards=True).val_folder() as val:
        if not val.is_dir():
            raise RegistryError(f"the training data {uri!r} has no val/ folder ({val}); pass "
                                "-P val_dir=<folder of validation images>")
        logger.info("parity images from the training data's validation set: %s", val)
        yield val


def _register(client, model_uri: str, name: str, facts: VersionFacts, fmt: str,
              paired: str | None = None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mv = mlflow.register_model(model_uri, name, tags=version_tags(facts, fmt, paired))
    except MlflowException as exc:
        raise RegistryError(f"registering {model_uri!r} as {name!r} failed: {exc.message}; "
                            "check the name (letters, digits, '-', '_', '.') and that the "
                            "tracking server has a model registry") from exc
    rm = client.get_registered_model(name)
    if not rm.description:
        kind = "ONNX (image pyfunc, servable)" if fmt == "onnx" else "PyTorch (pt2)"
        client.update_registered_model(name, description=(
            f"fowlflow image classifier, {kind}. Aliases: `candidate` = newest version, "
            "`champion` = promoted (`mlflow run . -e promote`). See each version's card."))
    if fmt == "onnx" or not paired:
        client.update_model_version(name, mv.version, description=model_card(facts, fmt, paired))
    return str(mv.version)


def _log_onnx(proto, facts: VersionFacts, run_id: str):
    """Log the ONNX model with the onnx flavor and fowlflow's image pyfunc; returns ModelInfo."""
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Map
    from PIL import Image

    from fowlflow.registry import image_pyfunc
    from fowlflow.tracking.requirements import installed_requirements

    # A synthetic 16 px PNG as input example: it exercises the served path at logging time
    # (MLflow validates it through the pyfunc) without copying a validation photo into the model.
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(png, format="PNG")
    # Outputs only: with an input schema MLflow checks requests before the pyfunc runs, and
    # refuses an empty batch ({"inputs": []}) that should get an empty answer. The input is
    # described in the metadata (PYFUNC_INPUT); the pyfunc checks every item itself.
    signature = ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(DataType.string, "label", required=False),
                        ColSpec(DataType.double, "score", required=False),
                        ColSpec(Map(DataType.double), "probabilities", required=False),
                        ColSpec(DataType.string, "error", required=False)]))
    metadata = {**facts.metadata, **facts.prep.as_dict(),
                "class_names": facts.class_names, "source_run_id": facts.source_run_id,
                "pytorch_model_uri": facts.model_uri,
                "onnx_input": "pixels: uint8 [N, image_size, image_size, 3] RGB",
                "pyfunc_input": image_pyfunc.PYFUNC_INPUT,
                "onnx_outputs": "logits, probabilities: float32 [N, num_classes]",
                **facts.parity.as_tags(), **{f"{k}_version": v for k, v in facts.versions.items()}}
    with installed_requirements():  # image_pyfunc.pip_requirements() are the installed versions
        return Model.log(
            artifact_path=None, name=ONNX_ARTIFACT, flavor=image_pyfunc, onnx_model=proto,
            run_id=run_id, signature=signature,
            input_example=pd.DataFrame({"image": [base64.b64encode(png.getvalue()).decode()]}),
            metadata=metadata, pip_requirements=image_pyfunc.pip_requirements(),
            onnx_execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )


def _log_parity(client, run_id: str, report: ParityReport, paths: list[Path], model_uri: str):
    for key, value in report.as_metrics().items():
        client.log_metric(run_id, key, value)
    client.log_dict(run_id, {"model_uri": model_uri, "passed": report.passed,
                             **report.as_tags(), "images": [str(p) for p in paths]},
                    "registry/parity.json")


def _val_acc(metadata: dict, client, run_id: str) -> float | None:
    if metadata.get("best_val_acc") is not None:
        return float(metadata["best_val_acc"])
    if run_id:
        value = client.get_run(run_id).data.metrics.get("best_val_acc")
        return None if value is None else float(value)
    return None


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fowlflow.registry.register",
                                description="Register a logged fowlflow model and its ONNX "
                                            "export (after a parity check).")
    p.add_argument("--model_uri", required=True,
                   help="runs:/<run_id>/model, models:/<name>/<version>, or a bare run id")
    p.add_argument("--name", default=DEFAULT_NAME, help="registered model name")
    p.add_argument("--val_dir", default="none",
                   help="folder of validation images (none: the training data's val/)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    p.add_argument("--max_images", type=int, default=DEFAULT_MAX_IMAGES)
    p.add_argument("--opset", type=int, default=0, help="ONNX opset (0: fowlflow's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    import mlflow

    args = build_parser().parse_args(argv)
    uri = args.model_uri if ":" in args.model_uri else f"runs:/{args.model_uri}/model"
    with mlflow.start_run() as run:  # under `mlflow run`, the project's own run
        log_params(vars(args))
        reg = register_model_uri(uri, args.name, given(args.val_dir), log_run_id=run.info.run_id,
                                 atol=args.atol, max_images=args.max_images,
                                 opset=args.opset or None)
        mlflow.set_tags({"registered_version": f"{reg.name}/{reg.version}",
                         "registered_onnx_version": f"{reg.onnx_name}/{reg.onnx_version}",
                         "registration": "reused" if reg.reused else "new"})
    if reg.reused:
        print(f"already registered: {uri} is {reg.name} version {reg.version} and "
              f"{reg.onnx_name} version {reg.onnx_version}; nothing new registered, aliases "
              f"unchanged ({reg.parity.summary()})")
    else:
        print(f"registered {reg.name} version {reg.version} and {reg.onnx_name} version "
              f"{reg.onnx_version} (alias {CANDIDATE!r}); {reg.parity.summary()}")
    return 0


if __name__ == "__main__":
    import sys

    from fowlflow.errors import exit_code
    from fowlflow.registry._cli import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sys.exit(exit_code(main))
