"""The Python snippets of docs/registry.md, run as written against a registered model (issue 8).

The snippets are read from the docs' ```python blocks (tests/docs_commands.py) and run as a
Python prompt would run them, in a folder holding the files they name (``turkey.jpg``,
``hen.png``, ``notes.txt``, and ``model/``, downloaded by the docs' own command), against a
real SQLite registry where ``fowl-classifier`` (224 px, the trainer's default) is champion.
"""

from __future__ import annotations

import ast
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BIN, HYMENOPTERA, ROOT, TURKEY
from tests.docs_commands import Command, bash_blocks, python_blocks
from tests.registry.conftest import hymenoptera_images, log_contract_model

pytestmark = pytest.mark.slow
DOC = ROOT / "docs" / "registry.md"
NAME = "fowl-classifier"  # the docs' model name


def run_snippet(cmd: Command) -> tuple[dict, object]:
    """Run a snippet as a Python prompt does: its names, and the value of its last line when
    that is an expression (what the prompt prints). Tracebacks point at the docs' lines."""
    tree = ast.parse(cmd.text)
    ast.increment_lineno(tree, cmd.line - 1)
    last = tree.body.pop() if isinstance(tree.body[-1], ast.Expr) else None
    names: dict = {"__name__": "__main__"}
    exec(compile(tree, str(DOC), "exec"), names)
    value = eval(compile(ast.Expression(last.value), str(DOC), "eval"), names) if last else None
    return names, value


@pytest.fixture
def docs_folder(tracking_uri, tmp_path):
    """tmp_path (the test's folder) with the snippets' files, and ``fowl-classifier`` version 1
    and its ONNX twin as champions."""
    from fowlflow.registry import register_trained_model
    from fowlflow.registry.promote import promote

    run_id = log_contract_model(classes=("chicken", "turkey"), image_size=224)
    register_trained_model(run_id=run_id, name=NAME, val_dir=HYMENOPTERA / "val", max_images=8)
    promote(NAME)
    (tmp_path / "turkey.jpg").symlink_to(TURKEY)
    with Image.open(hymenoptera_images(1)[0]) as photo:
        photo.save(tmp_path / "hen.png")
    (tmp_path / "notes.txt").write_text("eggs, grain, grit\n")
    (download,) = [c for b in bash_blocks(DOC) for c in b.commands
                   if c.text.startswith("mlflow artifacts download")]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", download.text], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path


def test_registry_md_python_snippets_run_as_written(docs_folder):
    snippets = {b.heading: b.commands[0] for b in python_blocks(DOC)}
    assert list(snippets) == ["ONNX export", "Using a model"]  # a new snippet needs its checks

    onnx_names, _ = run_snippet(snippets["ONNX export"])
    p = onnx_names["p"]
    assert p.shape == (1, 2) and abs(p.sum() - 1) < 1e-5

    _, table = run_snippet(snippets["Using a model"])
    assert list(table.columns) == ["label", "score", "probabilities", "error"] and len(table) == 3
    assert list(table["error"][:2]) == [None, None], list(table["error"])
    assert set(table["label"][:2]) <= {"chicken", "turkey"}
    assert table["label"][2] is None and table["probabilities"][2] is None
    assert table["error"][2].startswith("item 2: 'notes.txt' is not a readable image (")
    # The hand-written preprocessing of the first snippet is the served model's: same numbers.
    turkey = table["probabilities"][0]
    np.testing.assert_allclose([turkey["chicken"], turkey["turkey"]], p[0], atol=1e-6)
