"""Every command of README.md and docs/*.md runs in a test, as written, or is listed here with
the reason it can't run on this machine (issue 8: "the docs cannot drift again").

The rule: ``test_every_documented_command_is_run_by_a_test_or_listed`` collects each command
of the ```bash blocks (``tests/docs_commands.py``) and fails for one that no test runs and
``NOT_RUNNABLE`` does not list, for a stale entry, and for one both run and listed; so a new
or changed command breaks the build until a test runs it or a reason says why none can.
``test_every_code_block_of_the_docs_says_its_language`` keeps commands from hiding in
untagged blocks. A test claims what it runs, found by a scan of the sources under tests/:

* ``documented("<command as in the docs>")`` (a string literal): fails unless a block has
  exactly that command (comments aside), and returns its text, which the test then runs;
* in a ``test_*`` function, ``block_under(<...X.md>, "<heading>")`` claims that block and
  ``bash_blocks(<...X.md>)`` all of X.md (tests/registry/test_docs_commands.py runs
  docs/registry.md that way, and claims the README "Model registry" block by checking that
  each of its commands is one of docs/registry.md's).

The commands run in ``bash -c``, exactly as written, except for these, each visible in the
test that makes it:

* placeholders get real values, each checked to be in the command: ``/path/to/...`` -> a
  copy of the shared hymenoptera set's first photos (16 train, 8 val per class) or a real
  zip, ``RUN_ID`` -> a run id, ``[--tail N] [--node K]`` -> without the options and with
  N=2, K=0 (each of ``status|logs|attach|cancel`` runs);
  deployment.md's ``https://mlflow.example.com`` -> ``http://127.0.0.1:5000`` (its comment's
  local value) and ``MLFLOW_TRACKING_PASSWORD=...`` -> the user's password;
* setup a reader would already have: experiments 1-3, the model ``fowl-classifier`` and user
  ``bob`` that the users block names, and stdin carrying the passwords ``user add`` reads;
* environment variables the Makefile or the tools honour: ``EPOCHS=1`` where the command does
  not set EPOCHS (a short ``make train``), ``FOWLFLOW_CACHE_DIR`` and ``FOWLFLOW_SERVER_HOME``
  on temporary folders, ``MLFLOW_TRACKING_URI`` unset for ``make`` (its embedded default is
  what the README describes) and a temporary SQLite store for the backend commands;
* ``PATH`` starts with the venv's ``bin/`` (an activated venv), as bare ``mlflow`` and
  ``fowlflow`` in the docs assume;
* the working directory: a copy of the project (tracked and untracked-not-ignored files,
  ``.venv`` linked to this venv) for commands that write into it (``make train``: mlflow.db,
  mlruns/, outputs/); the repository root for ``bench/onnx_vs_torch.py``, which reads
  ``../shared/datasets`` next to it;
* servers on documented fixed ports (``make ui``'s 5000, the team stack's 5000/8333/5433) run
  in a private network namespace (``private_network``), so nothing else can hold the port.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, HYMENOPTERA, ROOT, make_imagefolder
from tests.docs_commands import Command, bash_blocks, private_network
from tests.net import free_port, wait_until

# ---------------------------------------------------------------------------------------------
# Commands that can't run on this machine, and why. Keys are commands as the docs write them
# (trailing comment dropped, whitespace collapsed).

INTERNET = "needs the internet: "
AWS = ("needs an AWS account (credentials, a GPU quota) and the internet; the emulated path "
       "(moto for EC2/SSM, sshd hosts at the addresses it assigns) runs in "
       "tests/projects/test_ec2_hosts.py")
NOT_RUNNABLE: dict[str, str] = {
    # README "Set up and run"
    "make train":
        INTERNET + "the default DATA is the sample's fowl_data.zip URL and the default "
        "WEIGHTS=imagenet downloads ResNet18's weights from download.pytorch.org (the offline "
        "forms below are run)",
    "make test":
        "is the whole test suite, this test included; CI runs it (.ci/run), a test can't",
    # docs/benchmarks.md "Test suite (CI budget)"
    "make test-fast":
        "is the fast pass of the suite, this test included; CI runs it as make test's first "
        "pass",
    # README "Launch on GPUs" and docs/backends.md
    """mlflow run . -b torchrun --env-manager local -c '{"process_count_per_node": "all"}'""":
        INTERNET + "the default data URL and ImageNet weights; on GPUs (the CPU form with "
        "-P data=synthetic -P weights=none is run)",
    """mlflow run . -b ssh -c '{"hosts": ["gpu-box"]}'""":
        "a real remote host gpu-box (ssh backends are tested against sshd hosts in network "
        "namespaces in tests/projects/test_ssh.py), plus the default data URL",
    """mlflow run . -b ssh -c '{"hosts": ["gpu-a", "gpu-b"], "process_count_per_node": 8}'""":
        "two real remote 8-GPU hosts gpu-a and gpu-b (two-node DDP over sshd namespaces is "
        "tested in tests/projects/test_ssh.py)",
    "mlflow run . -b ssh -c hosts.json":
        "hosts.json names the real remote hosts gpu-a and gpu-b",
    """mlflow run . -b torchrun --env-manager local -c '{"free_gpus": 2}' -P num_epochs=10""":
        "needs two idle NVIDIA GPUs (and the internet for the default data and weights)",
    # README "Launch on GPUs" and docs/ec2.md
    """mlflow run . -b ec2 -c '{"instance_type": "g6e.xlarge", "node_count": 2, "spot": true}' -P num_epochs=10""": AWS,
    """mlflow run . -b ec2 -c '{"instance_type": "g6e.xlarge"}' -P num_epochs=10""": AWS,
    """mlflow run . -b ec2 -c '{"instance_type": "g6e.xlarge", "node_count": 2, "spot": true}'""": AWS,
    """mlflow run . -b ec2 -c '{"cluster_name": "gpu-cluster", "instance_type": "g5.12xlarge"}'""": AWS,
    # README "Team tracking server" and docs/deployment.md
    "mlflow run . --env-manager local -P data=...":
        INTERNET + "the defaults (ResNet18, weights=imagenet, 25 epochs at 224 px) download "
        "ImageNet weights; a tiny training run through the team stack is the `trained` "
        "fixture of tests/server/conftest.py",
    "mlflow run . --env-manager local -P data=s3://datasets/fowl "
    "-P registered_model_name=fowl-classifier":
        INTERNET + "ImageNet weights (default), and a bucket `datasets`; a run on an s3:// "
        "dataset of the stack's S3, registered, is the `trained` fixture of "
        "tests/server/conftest.py",
    "mlflow server --backend-store-uri 'postgresql+psycopg://mlflow@db.internal:5432/mlflow"
    "?sslmode=verify-full' --artifacts-destination s3://acme-mlflow/artifacts "
    "--serve-artifacts --app-name basic-auth --host 127.0.0.1 --port 5000 --workers 4 "
    "--allowed-hosts mlflow.example.com --cors-allowed-origins https://mlflow.example.com":
        "production: a managed PostgreSQL at db.internal, the S3 bucket acme-mlflow and a TLS "
        "proxy for mlflow.example.com (the same server with local parts is `fowlflow server "
        "start`, run above)",
    # docs/benchmarks.md: measurements, run by hand on a quiet machine
    ".venv/bin/python bench/train_speed.py speed --data ../shared/datasets/hymenoptera_data":
        "benchmark: several minutes of 224 px ResNet18 training on 2 CPU cores, meaningful only "
        "on a quiet machine (its arguments are checked against its --help)",
    ".venv/bin/python bench/train_speed.py overhead --data ../shared/datasets/hymenoptera_data":
        "benchmark: 4 x 3 epochs of 224 px training, minutes; arguments checked against --help",
    ".venv/bin/python bench/train_speed.py accuracy --data ../shared/datasets/hymenoptera_data":
        "benchmark: 2 x 10 epochs of efficientnet_lite0 at 224 px, many minutes; arguments "
        "checked against --help",
    ".venv/bin/python bench/fixed_cost.py --data ../shared/datasets/hymenoptera_data --epochs 3":
        "benchmark: 3 epochs of 224 px training in a fresh interpreter, minutes; arguments "
        "checked against --help",
    ".venv/bin/python bench/fixed_cost.py --data ../shared/datasets/hymenoptera_data --epochs 3 "
    "--sample":
        "benchmark: 3 epochs of the sample's loop (its time and peak memory), minutes; "
        "arguments checked against --help",
    ".venv/bin/python bench/fixed_cost.py --data ../shared/datasets/hymenoptera_data --epochs 3 "
    "-- --batch_size 4":
        "benchmark: the same at the sample's batch size (its peak memory), minutes; arguments "
        "checked against --help",
    ".venv/bin/python bench/train_speed.py bare --data ../shared/datasets/hymenoptera_data "
    "--epochs 2 --repeats 2":
        "benchmark: 2 x 2 epochs of 224 px training against the bare step, minutes; arguments "
        "checked against --help",
    ".venv/bin/python bench/ec2_overhead.py --repeat 3":
        "benchmark: 6 launches through -b ssh and -b ec2 (moto, network-namespace hosts, an "
        "mlflow server), minutes; the same paths run in tests/projects/test_ec2_hosts.py; "
        "arguments checked against --help",
    ".venv/bin/python bench/tune_sweep.py --data ../shared/datasets/hymenoptera_data":
        "benchmark: two 8-trial efficientnet_lite0 sweeps at 224 px, 20-60 min on 2 CPU cores; "
        "arguments checked against --help",
    ".venv/bin/python bench/data_paths.py --quick":
        "benchmark: 4 training processes on photos, ~3 min on 2 cores, meaningful only on a quiet "
        "machine; the same paths are trained and compared in tests/trainer/test_data_paths.py "
        "(arguments checked against --help)",
    ".venv/bin/python bench/gpu_stream.py": "needs an NVIDIA GPU (nvjpeg)",
    ".venv/bin/python bench/shards_read.py --data ../shared/datasets/hymenoptera_data":
        "benchmark: packs and reads hymenoptera 3 times each through its own SeaweedFS; pack and "
        "read run in tests/data/test_shards*.py (arguments checked against --help)",
    ".venv/bin/python bench/gpu_torchrun.py --epochs 30 --batch-size 256":
        "needs an NVIDIA GPU (arguments checked against its --help)",
    ".venv/bin/python bench/onnx_vs_torch.py":
        "benchmark: the recorded run, about a minute of timing loops; its --quick form is run",
    ".venv/bin/python bench/load_server.py --clients 8 --steps 200 --metrics 5":
        "benchmark: 8 clients saturate the 2 cores for over a minute; the 1-client form is run",
    ".venv/bin/python bench/load_server.py --clients 8 --steps 200 --metrics 5 "
    "--auth-cache-ttl 0":
        "benchmark: about 7 minutes (logins without cache); arguments checked against --help",
}


def key(command: str) -> str:
    """A command as the tables name it: trailing comments dropped, continuation lines
    joined, whitespace collapsed."""
    code = "\n".join(line.split(" #", 1)[0].rstrip() for line in command.splitlines())
    return " ".join(code.replace("\\\n", " ").split())


# ---------------------------------------------------------------------------------------------
# Where the commands are, and which tests claim them.

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class DocCommand:
    path: Path
    heading: str
    command: Command

    @property
    def text(self) -> str:  # as written: continuation lines and trailing comments kept
        return self.command.text

    @property
    def where(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name}:{self.command.line} ({self.heading})"


def all_commands() -> list[DocCommand]:
    """Every command of the ```bash blocks of README.md and docs/*.md."""
    return [DocCommand(path, block.heading, cmd)
            for path in DOC_FILES for block in bash_blocks(path) for cmd in block.commands]


def comment(text: str) -> str:
    """The trailing comment of a command's first line, without the ``#``."""
    first = text.split("\n", 1)[0]
    return first.split(" #", 1)[1].strip() if " #" in first else ""


def documented(command: str) -> str:
    """The command exactly as the docs write it (continuation lines and trailing comment kept,
    bash ignores the comment); fails unless a ```bash block of README.md or docs/*.md has it.
    A test claims a command by calling this with a string literal."""
    found = [c for c in all_commands() if key(c.text) == key(command)]
    assert found, f"no ```bash block of README.md or docs/*.md has the command {command!r}"
    return found[0].text


def _md_name(node: ast.AST) -> str | None:
    """The ``X.md`` a path expression names (``ROOT / "docs" / "registry.md"``), if any."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) \
                and sub.value.endswith(".md"):
            return Path(sub.value).name
    return None


def claims_in_tests() -> tuple[dict[str, str], dict[tuple[str, str | None], str]]:
    """What the tests under tests/ run, found in their source:

    * ``documented("<command>")`` with a literal: that command;
    * inside a ``test_*`` function, ``block_under(<...X.md>, "<heading>")``: every command of
      that block, and ``bash_blocks(<...X.md>)``: every command of X.md (tests/docs_commands.py's
      way of running a whole block or file as written).

    Returns ({command key: where}, {(file name, heading or None): where}).
    """
    commands, blocks = {}, {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            first = node.args[0]
            if name == "documented" and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                commands[key(first.value)] = f"{rel}:{node.lineno}"
        for func in ast.walk(tree):
            if not (isinstance(func, ast.FunctionDef) and func.name.startswith("test_")):
                continue
            for node in ast.walk(func):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                md = _md_name(node.args[0])
                where = f"{rel}::{func.name}"
                if name == "block_under" and md and len(node.args) > 1 \
                        and isinstance(node.args[1], ast.Constant):
                    blocks[(md, node.args[1].value)] = where
                elif name == "bash_blocks" and md:
                    blocks[(md, None)] = where
    return commands, blocks


def substitute(command: str, values: dict[str, str]) -> str:
    """Replace placeholders by real values; each placeholder must be in the command."""
    for placeholder, value in values.items():
        assert placeholder in command, f"placeholder {placeholder!r} not in {command!r}"
        command = command.replace(placeholder, value)
    return command


def alternatives(command: str) -> list[str]:
    """``fowlflow status|logs RUN_ID`` -> ``fowlflow status RUN_ID``, ``fowlflow logs RUN_ID``."""
    match = re.search(r"\b(\w+(?:\|\w+)+)\b", command)
    assert match, f"no a|b alternatives in {command!r}"
    return [command[:match.start()] + word + command[match.end():]
            for word in match.group(1).split("|")]


def optional_forms(command: str) -> list[str]:
    """``cmd X [--a N] [--b K]`` -> ``cmd X`` and ``cmd X --a N --b K``."""
    assert re.search(r"\[[^]]+\]", command), f"no [optional] part in {command!r}"
    bare = " ".join(re.sub(r"\[[^]]+\]", "", command).split())
    full = re.sub(r"\[([^]]+)\]", r"\1", command)
    return [bare, full]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MLflow run/experiment/store choices, the venv's
    ``bin/`` first on PATH (an activated venv), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                        "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI",
                        # a shell, not a sub-make of `make test` (make[1]: Entering directory ...)
                        "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def bash(command: str, cwd: Path, env: dict, timeout: float = 600,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` as a user pasting it would: ``bash -c``, in ``cwd``."""
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{command}` (in {cwd}) failed with {proc.returncode}:\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


# ---------------------------------------------------------------------------------------------
# The rule itself (fast).


def test_every_documented_command_is_run_by_a_test_or_listed():
    commands = all_commands()
    assert len(commands) > 30, "the ```bash blocks of the docs were not found"
    check_commands(commands)


def test_the_rule_catches_a_new_command_and_a_stale_entry(tmp_path):
    def commands_of(text: str) -> list[DocCommand]:
        doc = tmp_path / "new.md"
        doc.write_text(text)
        return [DocCommand(doc, b.heading, c) for b in bash_blocks(doc) for c in b.commands]

    new = commands_of("# New\n\n```bash\nmake ui\nfowlflow frobnicate RUN_ID   # new\n```\n")
    with pytest.raises(AssertionError, match=r"new.md:5 \(New\): fowlflow frobnicate RUN_ID"):
        check_commands(new)
    # docs that lost `make train` (and everything else but `make ui`): its entry is stale
    with pytest.raises(AssertionError, match=r"not in the docs:\n\s*make train\n"):
        check_commands(commands_of("# Set up\n\n```bash\nmake ui\n```\n"))


def check_commands(commands: list[DocCommand]) -> None:
    """Fail for a command that no test claims and NOT_RUNNABLE does not list, for an entry
    or claim that names nothing in the docs, and for a command both run and listed."""
    by_command, by_block = claims_in_tests()
    blocks = {(c.path.name, c.heading) for c in commands}
    files = {c.path.name for c in commands}

    def runner(c: DocCommand) -> str | None:
        return (by_command.get(key(c.text)) or by_block.get((c.path.name, c.heading))
                or by_block.get((c.path.name, None)))

    unaccounted = [f"{c.where}: {key(c.text)}" for c in commands
                   if runner(c) is None and key(c.text) not in NOT_RUNNABLE]
    assert not unaccounted, (
        "documented commands that no test runs and NOT_RUNNABLE does not list (run each in a "
        "test, e.g. through documented(...), or list it with the reason it can't run here):\n  "
        + "\n  ".join(unaccounted))
    texts = {key(c.text) for c in commands}
    stale = ([k for k in [*NOT_RUNNABLE, *by_command] if k not in texts]
             + [f"{b} claimed by {w}" for b, w in by_block.items()
                if (b not in blocks if b[1] is not None else b[0] not in files)])
    assert not stale, "listed or claimed but not in the docs:\n  " + "\n  ".join(stale)
    both = [f"{c.where}: {key(c.text)} (run by {runner(c)})" for c in commands
            if runner(c) and key(c.text) in NOT_RUNNABLE]
    assert not both, "run by a test yet listed as not runnable:\n  " + "\n  ".join(both)


def test_every_code_block_of_the_docs_says_its_language():
    """Only ```bash blocks are collected as commands, so an untagged block could hide a
    command from the rule above: every fence names its language (``text`` for diagrams)."""
    untagged = []
    for path in DOC_FILES:
        inside = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                if not inside and not line[3:].strip():
                    untagged.append(f"{path.relative_to(ROOT)}:{n}")
                inside = not inside
    assert not untagged, "code blocks without a language (```bash, ```text, ...): " + \
        ", ".join(untagged)


def _help(helps: dict[str, str], target: str) -> str:
    """``python TARGET --help`` (a script path, or ``-m module``), run once per target."""
    if target not in helps:
        helps[target] = bash(f"{shlex.quote(str(BIN / 'python'))} {target} --help", ROOT,
                             clean_env(), timeout=120).stdout
    return helps[target]


def _lists(help_text: str, word: str) -> bool:
    """Whether ``word`` appears in ``help_text`` as a whole flag or word."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", help_text) is not None


def test_benchmark_commands_not_run_use_arguments_their_scripts_take():
    """Benchmarks too long for the suite still can't drift: each ``--flag`` they pass is one
    their script's ``--help`` lists, and each script exists."""
    checked, helps = 0, {}
    for command in NOT_RUNNABLE:
        if not command.startswith(".venv/bin/python bench/"):
            continue
        argv = shlex.split(command)
        assert (ROOT / argv[1]).is_file(), argv[1]
        args, passed_on = argv[2:], []
        if "--" in args:  # what follows goes to the trainer (fixed_cost.py's `extra`)
            args, passed_on = args[:args.index("--")], args[args.index("--") + 1:]
        help_text = _help(helps, argv[1])
        for arg in passed_on:
            assert not arg.startswith("--") or _lists(_help(helps, "-m fowlflow.train"), arg), \
                f"python -m fowlflow.train --help has no {arg} ({argv[1]} passes it on)"
        for i, arg in enumerate(args):
            if arg.startswith("--") or (i == 0 or not args[i - 1].startswith("--")):
                # a flag, or a positional word (a sub-command such as `speed`)
                assert _lists(help_text, arg), f"{argv[1]} --help has no {arg}:\n{help_text}"
        checked += 1
    assert checked >= 5


# ---------------------------------------------------------------------------------------------
# README "Set up and run": make train (offline forms) and make ui, in a copy of the project.


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project as a user's clone would be (tracked files and untracked ones that
    are not ignored, mtimes kept), with ``.venv`` linked to the venv running these tests."""
    dest = tmp_path_factory.mktemp("docs") / "fowlflow"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
                           ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    venv = BIN.parent
    (dest / ".venv").symlink_to(venv)
    # The venv is installed (that is how these tests run): make must not reinstall it, which
    # it would if pyproject.toml were newer than its install stamp.
    stamp = venv / ".installed"
    if stamp.exists() and (dest / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        os.utime(dest / "pyproject.toml", (stamp.stat().st_mtime - 1,) * 2)
    plan = bash("make -n train", dest, clean_env()).stdout
    assert "pip install" not in plan, \
        f"make train would reinstall the venv {venv} (no .installed stamp?):\n{plan}"
    return dest


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fowlflow-cache"))


def embedded_store(project: Path):
    """The MLflow client of ``make train``'s embedded default: ./mlflow.db in the project."""
    from mlflow import MlflowClient

    assert (project / "mlflow.db").is_file(), "make train wrote no ./mlflow.db"
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def make_train_run(project: Path, data: str):
    """The FINISHED run of experiment ``fowlflow`` in the embedded store that trained ``data``."""
    client = embedded_store(project)
    exp = client.get_experiment_by_name("fowlflow")
    assert exp is not None, "make train did not use experiment 'fowlflow'"
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.params["data"] == data]
    assert len(runs) == 1, [r.data.params for r in client.search_runs([exp.experiment_id])]
    run = runs[0]
    assert run.info.status == "FINISHED"
    # "artifacts in ./mlruns"
    assert run.info.artifact_uri.startswith(str(project / "mlruns")), run.info.artifact_uri
    return client, run


@pytest.fixture(scope="module")
def zip_trained(project, cache_dir, tmp_path_factory):
    """``make train DATA=/path/to/images.zip WEIGHTS=none EPOCHS=5``, with a real zip."""
    folder = make_imagefolder(tmp_path_factory.mktemp("zipsrc") / "images")
    archive = tmp_path_factory.mktemp("zip") / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # one top folder inside, as users zip
        for f in sorted(folder.rglob("*")):
            zf.write(f, f.relative_to(folder.parent))
    command = substitute(
        documented("make train DATA=/path/to/images.zip WEIGHTS=none EPOCHS=5"),
        {"/path/to/images.zip": str(archive)})
    proc = bash(command, project, clean_env(FOWLFLOW_CACHE_DIR=cache_dir), timeout=600)
    return str(archive), proc


@pytest.fixture(scope="module")
def hymenoptera_data(tmp_path_factory) -> Path:
    """A copy of the first photos of the shared hymenoptera_data (16 train and 8 val photos of
    each class, same layout): the same kind of data as the docs' ``/path/to/hymenoptera_data``
    at a tenth of the training time on 2 cores."""
    dest = tmp_path_factory.mktemp("data") / "hymenoptera_data"
    for split, n in (("train", 16), ("val", 8)):
        for cls in ("ants", "bees"):
            (dest / split / cls).mkdir(parents=True)
            photos = sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]
            assert len(photos) == n, f"{HYMENOPTERA / split / cls}: fewer than {n} photos"
            for photo in photos:
                shutil.copy(photo, dest / split / cls / photo.name)
    return dest


def test_make_train_offline_with_shipped_imagenet_weights(project, cache_dir, hymenoptera_data):
    command = substitute(
        documented("make train DATA=/path/to/hymenoptera_data ARCH=efficientnet_lite0"),
        {"/path/to/hymenoptera_data": str(hymenoptera_data)})
    bash(command, project, clean_env(FOWLFLOW_CACHE_DIR=cache_dir, EPOCHS="1"), timeout=600)
    client, run = make_train_run(project, str(hymenoptera_data))
    params = run.data.params
    assert (params["arch"], params["weights"], params["num_epochs"]) == \
        ("efficientnet_lite0", "imagenet", "1")
    assert run.data.tags["class_names"] == "ants, bees"
    assert 0 <= run.data.metrics["best_val_acc"] <= 1
    # ... and registered, as every training run is by default
    version = client.get_model_version_by_alias("fowl-classifier", "candidate")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("fowl-classifier-onnx", "candidate")


def test_make_train_from_a_zip_from_scratch(project, zip_trained):
    archive, proc = zip_trained
    client, run = make_train_run(project, archive)
    assert (run.data.params["weights"], run.data.params["num_epochs"]) == ("none", "5")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == \
        [1, 2, 3, 4, 5]
    assert (project / "outputs" / "checkpoint.pt").is_file()


def test_make_ui_serves_the_runs_of_make_train(project, zip_trained, tmp_path):
    """``make ui`` as written, on its documented http://127.0.0.1:5000 (in a private network
    namespace, so that port can't be taken by anything else), then stopped."""
    import click
    from mlflow.cli import cli

    command = documented("make ui")
    # "= .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  -> http://127.0.0.1:5000"
    said = re.search(r"= (\S+ ui --backend-store-uri \S+)\s+-> (http://127\.0\.0\.1:(\d+))",
                     comment(command))
    assert said, f"the make ui line no longer says what it runs: {command!r}"
    assert bash("make -n ui", project, clean_env()).stdout.strip() == said.group(1)
    ui_command = cli.get_command(click.Context(cli), "ui")  # an alias of `mlflow server`
    port_option = next(p for p in ui_command.params if p.name == "port")
    assert port_option.default == int(said.group(3))

    log = tmp_path / "make-ui.log"
    with private_network() as prefix, open(log, "w") as out:
        env, base = clean_env(MLFLOW_WORKERS="1"), said.group(2)
        if not prefix:  # no namespaces (not root): another free port, through mlflow's variable
            assert port_option.envvar == "MLFLOW_PORT"
            env["MLFLOW_PORT"] = str(free_port())
            base = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        proc = subprocess.Popen([*prefix, "bash", "-c", command], cwd=project, env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)

        def get(path: str, data: dict | None = None) -> str:
            """curl, in the namespace where the server listens."""
            args = ["curl", "-sf", "--max-time", "30", base + path]
            if data is not None:
                args += ["-H", "Content-Type: application/json", "-d", json.dumps(data)]
            got = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=60)
            if got.returncode != 0:
                raise OSError(f"curl {path}: exit {got.returncode} {got.stderr}")
            return got.stdout

        def page_or_none() -> str | None:
            try:
                return get("/")
            except OSError:
                return None

        try:
            page = wait_until(page_or_none, what=f"make ui's page at {base}/", timeout=120,
                              interval=0.5, proc=proc, log=log)
            assert "<!doctype html>" in page.lower() and "static-files" in page
            # the UI's own API: experiment `fowlflow` of ./mlflow.db has make train's run
            exp = json.loads(get("/ajax-api/2.0/mlflow/experiments/get-by-name"
                                 "?experiment_name=fowlflow"))["experiment"]
            runs = json.loads(get("/ajax-api/2.0/mlflow/runs/search",
                                  {"experiment_ids": [exp["experiment_id"]]}))["runs"]
            datas = {p["value"] for r in runs for p in r["data"]["params"] if p["key"] == "data"}
            assert zip_trained[0] in datas, datas
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a command started with ``start_new_session`` and everything it started (its
    process group, e.g. make -> mlflow ui -> uvicorn and job workers); SIGKILL after timeout."""
    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    if alive():
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        proc.poll()  # reap the leader so that the group can empty
        time.sleep(0.2)
    if alive():
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout)


# ---------------------------------------------------------------------------------------------
# README "Launch on GPUs" and docs/backends.md: the torchrun backend on CPUs, fowlflow's CLI.


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store for one test, its tables created (so that the CLI and
    this test's polling don't both migrate a new database at once) from tmp_path, so the
    Default experiment keeps its artifacts in tmp_path/mlruns, not in the repository."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with monkeypatch.context() as here:
        here.chdir(tmp_path)
        MlflowClient(uri).search_experiments()
    return uri


def _drop_run_dir(run) -> None:
    """The torchrun backend's default run_dir is ~/.fowlflow/runs: remove this run's folder."""
    run_dir = run.data.tags.get("fowlflow.run_dir")
    if run_dir and Path(run_dir).name == run.info.run_id:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_torchrun_backend_cpu_smoke_test(project, cache_dir, sqlite_store):
    from mlflow import MlflowClient

    command = documented(
        """mlflow run . -b torchrun --env-manager local -c '{"process_count_per_node": 2}' \\
  -P data=synthetic -P weights=none -P num_epochs=1 -P image_size=64""")
    proc = bash(command, project, clean_env(MLFLOW_TRACKING_URI=sqlite_store,
                                            FOWLFLOW_CACHE_DIR=cache_dir), timeout=600)
    client = MlflowClient(sqlite_store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    _drop_run_dir(run)
    assert "Epoch 1/1" in proc.stdout  # streamed while it ran
    assert run.info.status == "FINISHED"
    assert run.data.tags["fowlflow.backend"] == "torchrun"
    assert run.data.tags["fowlflow.gpus"] == "none (CPU, gloo)"
    assert run.data.params["world_size"] == "2"
    assert client.get_model_version_by_alias("fowl-classifier-onnx", "candidate")


def test_fowlflow_status_logs_attach_cancel(sqlite_store, tmp_path):
    """Every form of the fowlflow commands of README and docs/backends.md, on a real detached
    torchrun run (the backend tests' stand-in entry point: many short logged steps)."""
    from mlflow import MlflowClient

    from tests.projects.helpers import STANDIN, marked_processes

    env = clean_env(MLFLOW_TRACKING_URI=sqlite_store)
    config = json.dumps({"process_count_per_node": 1, "wait": False,
                         "run_dir": str(tmp_path / "runs")})
    bash(f"mlflow run {STANDIN} -b torchrun --env-manager local -c '{config}' "
         "-P steps=600 -P sleep=0.2", tmp_path, env, timeout=300)
    client = MlflowClient(sqlite_store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = run.info.run_id
    try:
        wait_until(lambda: len(client.get_metric_history(run_id, "allreduce_sum")) >= 2,
                   what="two logged steps of the detached run", timeout=180, interval=0.5)

        readme = alternatives(key(documented("fowlflow status|logs|attach|cancel RUN_ID")))
        status, logs, attach, cancel = [substitute(c, {"RUN_ID": run_id}) for c in readme]
        assert [c.split()[1] for c in readme] == ["status", "logs", "attach", "cancel"]
        # docs/backends.md writes the same four (their comments aside), logs with options
        assert key(documented("fowlflow status RUN_ID")) == readme[0]
        bare, full = optional_forms(documented("fowlflow logs RUN_ID [--tail N] [--node K]"))
        assert key(bare) == readme[1]
        tail_logs = substitute(full, {"RUN_ID": run_id, "--tail N": "--tail 2",
                                      "--node K": "--node 0"})
        assert key(documented("fowlflow attach RUN_ID")) == readme[2]
        assert key(documented("fowlflow cancel RUN_ID")) == readme[3]

        out = bash(status, tmp_path, env).stdout
        assert "node0: RUNNING" in out, out
        out = bash(logs, tmp_path, env).stdout
        assert "rank 0 step 0 sum 1" in out, out
        tail = bash(tail_logs, tmp_path, env).stdout.strip().splitlines()
        assert len(tail) == 2 and all(line.startswith("rank 0 step ") for line in tail), tail

        attach_out, attach_err = tmp_path / "attach.out", tmp_path / "attach.err"
        with open(attach_out, "w") as out_sink, open(attach_err, "w") as err_sink:
            attached = subprocess.Popen(["bash", "-c", attach], cwd=tmp_path, env=env,
                                        stdout=out_sink, stderr=err_sink,
                                        start_new_session=True)
        try:
            # attach streams the run's output (stdout) and keeps following it while it runs
            wait_until(lambda: "rank 0 step" in attach_out.read_text(),
                       what="attach streaming the run's output", timeout=120,
                       proc=attached, log=attach_err)
            assert attached.poll() is None, attach_err.read_text()[-3000:]
            bash(cancel, tmp_path, env, timeout=120)
            attached.wait(timeout=120)
        finally:
            stop_group(attached)
        assert attached.returncode != 0, "attach must exit non-zero for a cancelled run"
        assert client.get_run(run_id).info.status == "KILLED"
        assert not marked_processes(run_id)
        out = bash(status, tmp_path, env, check=False).stdout
        assert "node0: KILLED" in out, out
    finally:
        if client.get_run(run_id).info.status == "RUNNING":
            bash(f"fowlflow cancel {run_id}", tmp_path, env, check=False)


# ---------------------------------------------------------------------------------------------
# docs/benchmarks.md: the forms short enough for the suite.


def test_onnx_benchmark_quick_form():
    # run where the docs run it: the repository root (the script reads ../shared/datasets)
    proc = bash(documented(".venv/bin/python bench/onnx_vs_torch.py --quick"), ROOT,
                clean_env(), timeout=600)
    assert re.search(r"parity on \d+ photos: top-1 100%", proc.stdout), proc.stdout[-2000:]


def test_load_benchmark_one_client(project):
    # in the project copy: the script writes bench/results/ next to itself
    proc = bash(documented(".venv/bin/python bench/load_server.py --clients 1 --steps 200 "
                           "--metrics 5"), project, clean_env(), timeout=600)
    assert "| 1 | 200 x 5 |" in proc.stdout, proc.stdout[-3000:]  # the row for the table
    (result,) = (project / "bench" / "results").glob("load_server-*.json")
    data = json.loads(result.read_text())
    assert data["metric_values_sent"] == data["metric_rows_in_postgres"] == 1000


# ---------------------------------------------------------------------------------------------
# README "Team tracking server" and docs/deployment.md: a fresh stack started as written.


_RESULT = "\0fowlflow-result "
# Runs each request {"env", "code"} as `python -c code` would (stdout, stderr, exit status),
# with mlflow imported once; answers one line starting with _RESULT.
_PYTHON_WORKER = f"""
import contextlib, io, json, os, sys, traceback
import mlflow
for line in sys.stdin:
    request = json.loads(line)
    os.environ.clear()
    os.environ.update(request["env"])
    out, err, rc = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            exec(compile(request["code"], "<string>", "exec"),
                 {{"__name__": "__main__", "mlflow": mlflow, "c": mlflow.MlflowClient()}})
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    sys.__stdout__.write({_RESULT!r} + json.dumps({{"rc": rc, "stdout": out.getvalue(),
                                                 "stderr": err.getvalue()}}) + "\\n")
    sys.__stdout__.flush()
"""


class Shell:
    """One user's terminal: each command runs in ``bash -c`` (in ``prefix``, e.g. a network
    namespace), and what it exports or evals (``eval "$(fowlflow server env)"``) stays set for
    the next command, as in an interactive shell. Each command gets its own stdin."""

    def __init__(self, cwd: Path, env: dict, prefix: list, tmp: Path):
        self.cwd, self.env, self.prefix, self.envfile = cwd, dict(env), list(prefix), tmp / "env"
        self.worker_log = tmp / "python-worker.log"
        self._worker: subprocess.Popen | None = None

    def python(self, code: str, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
        """``python -c`` of ``code`` with ``mlflow`` imported and ``c = mlflow.MlflowClient()``,
        in this shell (its environment now, plus ``env``, and its namespace): the checks'
        client. One Python process serves every call (a fresh interpreter per check spends
        seconds importing mlflow); each call gets the shell's environment and a new client,
        which reads the tracking URI and credentials from it."""
        if self._worker is None or self._worker.poll() is not None:
            with open(self.worker_log, "a") as log:
                self._worker = subprocess.Popen(
                    [*self.prefix, str(BIN / "python"), "-c", _PYTHON_WORKER], cwd=self.cwd,
                    env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    text=True)
        request = {"env": {**self.env, **(env or {})}, "code": code}
        self._worker.stdin.write(json.dumps(request) + "\n")
        self._worker.stdin.flush()
        line = ""
        while not line.startswith(_RESULT):
            line = self._worker.stdout.readline()
            assert line, f"the Python worker exited:\n{self.worker_log.read_text()[-3000:]}"
        done = json.loads(line[len(_RESULT):])
        proc = subprocess.CompletedProcess(code, done["rc"], done["stdout"], done["stderr"])
        if check and proc.returncode != 0:
            raise AssertionError(f"python -c {code!r} failed:\n{proc.stderr[-6000:]}")
        return proc

    def close(self) -> None:
        if self._worker is not None and self._worker.poll() is None:
            self._worker.stdin.close()
            try:
                self._worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait()

    def run(self, command: str, stdin: str = "", check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
        script = f"{command}\n__rc=$?\nenv -0 > {shlex.quote(str(self.envfile))}\nexit $__rc"
        proc = subprocess.run([*self.prefix, "bash", "-c", script], cwd=self.cwd, env=self.env,
                              input=stdin, capture_output=True, text=True, timeout=timeout)
        if self.envfile.exists():
            pairs = (item.split("=", 1) for item in self.envfile.read_text().split("\0"))
            self.env = {k: v for k, v in (p for p in pairs if len(p) == 2) if k != "__rc"}
            self.envfile.unlink()
        if check and proc.returncode != 0:
            raise AssertionError(f"`{command}` failed with {proc.returncode}:\n"
                                 f"--- stdout ---\n{proc.stdout[-3000:]}\n"
                                 f"--- stderr ---\n{proc.stderr[-6000:]}")
        return proc


@pytest.fixture
def team_shell(project, tmp_path):
    """A shell in a private network namespace (the documented ports 5000, 8333 and 5433 are
    free there), in the project copy, with FOWLFLOW_SERVER_HOME (the state directory variable
    `fowlflow server` honours) on a fresh folder; the stack is stopped afterwards."""
    import tempfile

    # under /tmp, not pytest's 0700 tmp root: the postgres user must reach the data dir
    state = Path(tempfile.mkdtemp(prefix="ffdocs-", dir="/tmp"))
    os.chmod(state, 0o711)
    with private_network() as prefix:
        assert prefix, "needs root and iproute2: the stack runs on its documented ports in a " \
                       "private network namespace"
        shell = Shell(project, clean_env(FOWLFLOW_SERVER_HOME=str(state)), prefix, tmp_path)
        try:
            yield shell
        finally:
            shell.close()
            stop = shell.run("fowlflow server stop", check=False)
            logs = ROOT / "test-output" / "docs-server-logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in [*(state / "logs").glob("*.log"), state / "postgres" / "postgres.log"]:
                if log.exists():
                    shutil.copy(log, logs / log.name)
            shutil.rmtree(state, ignore_errors=True)
            assert stop.returncode == 0, stop.stdout + stop.stderr


def py(sh: Shell, code: str, check: bool = True) -> subprocess.CompletedProcess:
    """Python with mlflow imported, in the shell (its MLFLOW_TRACKING_* and namespace)."""
    return sh.python(code, check=check)


def as_user(user: str, password: str) -> dict:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def test_team_server_commands(team_shell):
    """README "Team tracking server" and docs/deployment.md, in the order a reader goes, on
    one fresh stack; each step's effect is checked through the server."""
    sh = team_shell
    pw = {name: f"{name}-{os.urandom(8).hex()}" for name in ("alice", "alice2", "bob", "viewer")}

    # README "Team tracking server"
    out = sh.run(documented("fowlflow server start")).stdout
    assert "http://127.0.0.1:5000" in out, out
    assert f"state in {sh.env['FOWLFLOW_SERVER_HOME']}" in out, out
    sh.run(documented('eval "$(fowlflow server env)"'))
    assert sh.env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert sh.env["MLFLOW_TRACKING_USERNAME"] and sh.env["MLFLOW_TRACKING_PASSWORD"]
    # what the `mlflow run .` line would create on a fresh server: experiment 1
    sh.run("mlflow experiments create -n team-docs")
    sh.run(documented("fowlflow server user add alice && "
                      "fowlflow server grant alice experiment 1 EDIT"), stdin=pw["alice"] + "\n")
    status = sh.run(documented("fowlflow server status")).stdout
    assert status.count("127.0.0.1") >= 3, status
    # alice can now log runs into experiment 1
    code = "r = c.create_run('1'); c.log_metric(r.info.run_id, 'm', 1.0); print(r.info.run_id)"
    run_id = sh.python(code, as_user("alice", pw["alice"])).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", run_id), run_id

    # docs/deployment.md "One command": start again (idempotent), status, stop keeps the data
    sh.run(documented("fowlflow server start"))
    sh.run(documented('eval "$(fowlflow server env)"'))
    sh.run(documented("fowlflow server status"))
    sh.run(documented("fowlflow server stop"))
    down = sh.run("fowlflow server status", check=False)
    assert down.returncode == 3, down.stdout + down.stderr
    sh.run("fowlflow server start")
    assert "'m': 1.0" in py(sh, f"print(c.get_run('{run_id}').data.metrics)").stdout

    # docs/deployment.md "Users and permissions": what the commands name must exist first
    sh.run("mlflow experiments create -n team-docs-2 && mlflow experiments create -n team-docs-3")
    py(sh, "c.create_registered_model('fowl-classifier')")
    sh.run("fowlflow server user add bob", stdin=pw["bob"] + "\n")
    # a reader of deployment.md starts without alice; the README steps above made one
    py(sh, "from mlflow.server.auth.client import AuthServiceClient\n"
           "AuthServiceClient(mlflow.get_tracking_uri()).delete_user('alice')")

    def can(user: str, code: str) -> bool:
        proc = sh.python(code, as_user(user, pw[user]), check=False)
        assert proc.returncode == 0 or "PERMISSION_DENIED" in proc.stderr or "403" in \
            proc.stderr, proc.stderr[-3000:]
        return proc.returncode == 0

    sh.run(documented("fowlflow server user add alice"), stdin=pw["alice"] + "\n")
    sh.run(documented("fowlflow server user add viewer --read-only"), stdin=pw["viewer"] + "\n")
    assert can("viewer", "c.get_experiment('1')")
    assert not can("viewer", "c.create_experiment('viewer-made')")
    sh.run(documented("fowlflow server user password alice"), stdin=pw["alice2"] + "\n")
    pw["alice"] = pw["alice2"]
    sh.run(documented("fowlflow server user role viewer member"))
    assert can("viewer", "c.create_experiment('viewer-made')")
    assert not can("alice", "c.create_run('3')")
    sh.run(documented("fowlflow server grant alice experiment 3 EDIT"))
    assert can("alice", "c.create_run('3')")
    assert not can("alice", "c.set_registered_model_tag('fowl-classifier', 'k', 'v')")
    sh.run(documented("fowlflow server grant alice registered_model fowl-classifier EDIT"))
    assert can("alice", "c.set_registered_model_tag('fowl-classifier', 'k', 'v')")
    assert can("bob", "c.get_experiment('3')")
    sh.run(documented("fowlflow server grant bob experiment 3 DENY"))
    assert not can("bob", "c.get_experiment('3')")
    sh.run(documented("fowlflow server revoke bob experiment 3"))
    assert can("bob", "c.get_experiment('3')")

    # docs/deployment.md "What a user sets": the production URL is the placeholder for a
    # server; its comment gives the local one
    sh.run(substitute(documented("export MLFLOW_TRACKING_URI=https://mlflow.example.com"),
                      {"https://mlflow.example.com": "http://127.0.0.1:5000"}))
    sh.run(documented("export MLFLOW_TRACKING_USERNAME=alice"))
    sh.run(substitute(documented("export MLFLOW_TRACKING_PASSWORD=..."), {"...": pw["alice"]}))
    assert py(sh, "print(c.create_run('3').info.user_id)").stdout.strip() == "alice"
