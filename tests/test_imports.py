"""Imports flow one way: entry points → trainer / registry → tracking / data → bottom modules.

Two checks keep it so:

* every ``import`` and ``from`` statement in ``fowlflow/**/*.py`` (those inside functions too)
  is read from the source and checked against :data:`ALLOWED`;
* each package is imported, with all of its modules, in a fresh interpreter, which then must
  not hold a fowlflow package its layer may not use; ``fowlflow.data`` and the registry's
  torch-free modules (those a served ONNX model runs) must not load torch either.

A new package or top-level module needs a row in :data:`LAYERS` first.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fowlflow"

# Module-name prefix → layer; the longest matching prefix wins.
LAYERS = {
    "fowlflow": "root",  # the package's own __init__ (a docstring and __version__)
    "fowlflow.errors": "errors",
    "fowlflow.local_paths": "bottom",
    "fowlflow.stopping": "bottom",
    "fowlflow.data": "data",
    "fowlflow.tracking": "tracking",
    "fowlflow.trainer": "trainer",
    "fowlflow.registry": "registry",
    "fowlflow.projects": "projects",
    "fowlflow.server": "server",
    "fowlflow.tune": "tune",
    "fowlflow.cli": "entry",
    "fowlflow.train": "entry",
}
# Layer → the layers its modules may import (besides "root", which anything may import).
ALLOWED = {
    "root": {"root"},
    "errors": {"errors"},
    "bottom": {"bottom", "errors"},
    "data": {"data", "bottom", "errors"},
    "tracking": {"tracking", "data", "bottom", "errors"},
    "trainer": {"trainer", "tracking", "data", "bottom", "errors"},
    "registry": {"registry", "tracking", "data", "bottom", "errors"},
    "tune": {"tune", "trainer", "registry", "projects", "tracking", "data", "bottom",
             "errors"},  # projects: the backends' config parsers (-P backend_config)
    "projects": {"projects", "bottom", "errors"},
    "server": {"server", "errors"},
    "entry": set(LAYERS.values()),
}
# Modules a served ONNX model imports: they must not load torch.
TORCH_FREE = ("fowlflow.data", "fowlflow.registry", "fowlflow.registry.image_pyfunc")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:n]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for each fowlflow module ``path`` imports, relative ones resolved."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from fowlflow.x import y`: y may be a module
                sub = f"{base}.{alias.name}"
                as_module = PACKAGE.parent.joinpath(*sub.split("."))
                is_module = as_module.with_suffix(".py").is_file() or as_module.is_dir()
                found.append((node.lineno, sub if is_module else base))
    return sorted({(line, m) for line, m in found if m == "fowlflow" or m.startswith("fowlflow.")})


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in source_files() if layer_of(module_name(p)) is None]
    assert not missing, f"add these to LAYERS in tests/test_imports.py: {missing}"


def test_import_statements_flow_one_way():
    wrong = []
    for path in source_files():
        here = layer_of(module_name(path))
        for line, target in imported_modules(path):
            there = layer_of(target)
            if there is None or there not in ALLOWED[here] | {"root"}:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {target} "
                             f"({there})")
    assert not wrong, ("imports against the layer table (entry points → trainer / registry → "
                       "tracking / data → errors):\n  " + "\n  ".join(wrong))


PROBE = """
import importlib, json, pkgutil, sys
name, skip = sys.argv[1], tuple(json.loads(sys.argv[3]))
pkg = importlib.import_module(name)
names = [name]
if sys.argv[2] == "all" and hasattr(pkg, "__path__"):
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, name + ".")
              if not m.name.startswith(skip)]
for m in names:
    importlib.import_module(m)
print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def fresh_import(name: str, everything: bool) -> dict:
    """Import ``name`` (with ``everything``: and all its modules of the same layer) in a new
    interpreter; returns the modules imported and every module then loaded."""
    others = [m + "." for m in LAYERS if m.startswith(name + ".") and LAYERS[m] != LAYERS[name]]
    proc = subprocess.run([sys.executable, "-c", PROBE, name, "all" if everything else "one",
                           json.dumps(others)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return (path / "__init__.py").is_file() or path.with_suffix(".py").is_file()


# Every package and bottom module of the table that exists now (not the entry points).
PACKAGES = sorted(m for m, layer in LAYERS.items() if layer not in ("root", "entry") and _exists(m))


@pytest.mark.parametrize("name", PACKAGES)
def test_a_fresh_interpreter_loads_no_forbidden_package(name):
    layer = layer_of(name)
    result = fresh_import(name, everything=True)
    ours = set(result["imported"])
    forbidden = []
    for loaded in result["loaded"]:
        if loaded in ours or not loaded.startswith("fowlflow.") or name.startswith(loaded + "."):
            continue  # itself, not ours, or a parent package Python loads on the way
        there = layer_of(loaded)
        if there is None or there not in ALLOWED[layer] | {"root"}:
            forbidden.append(f"{loaded} ({there})")
    assert not forbidden, f"importing {name} ({layer}) loaded {forbidden}"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_modules_do_not_load_torch(name):
    result = fresh_import(name, everything=name == "fowlflow.data")
    heavy = [m for m in ("torch", "torchvision") if m in result["loaded"]]
    assert not heavy, f"importing {name} loaded {heavy}; the served ONNX model must not need it"
