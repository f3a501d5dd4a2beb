"""Project environments on a remote host, keyed by a hash of what defines them.

``--env-manager virtualenv|uv|conda`` builds ``<remote_dir>/envs/<manager>-<hash>`` once; the
next run with the same conda.yaml / python_env.yaml / requirements reuses it (the hash covers
the manager, the spec files' content and the host's Python version). ``local`` uses the host's
Python as it is::

    spec = env_spec(project_dir, "virtualenv", host_python_version="3.11")
    spec.key                       # "virtualenv-1f3a..."; same files -> same key -> reuse
    result = prepare(runner, spec, python="python3", envs_dir="/home/a/.fowlflow/envs")
    result["python"], result["reused"]

Creation runs on the host under ``flock``, so two runs (or two nodes sharing a home over NFS)
never build the same environment at once; ``.fowlflow-ready`` is written last, so a half-built
environment is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.runners import Runner

# Runs with the host's python3 (stdlib only). argv: manager env_dir project_dir requirements
PREPARE_SOURCE = r"""
import fcntl, json, os, shutil, subprocess, sys
mgr, env_dir, project_dir, reqs = sys.argv[1:5]
os.makedirs(os.path.dirname(env_dir), exist_ok=True)
ready = os.path.join(env_dir, ".fowlflow-ready")
with open(env_dir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(ready):
        print(json.dumps({"reused": True}))
        sys.exit(0)
    shutil.rmtree(env_dir, ignore_errors=True)
    def run(cmd):
        proc = subprocess.run(cmd, cwd=project_dir, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode:
            sys.exit("environment step failed (%d): %s" % (proc.returncode, " ".join(cmd)))
    if mgr == "conda":
        conda = shutil.which("mamba") or shutil.which("conda")
        if not conda:
            sys.exit("conda is not on the host's PATH; install Miniforge or use "
                     "--env-manager virtualenv")
        run([conda, "env", "create", "--yes", "-p", env_dir, "-f",
             os.path.join(project_dir, "conda.yaml")])
    elif mgr == "uv":
        uv = shutil.which("uv")
        if not uv:
            sys.exit("uv is not on the host's PATH; install it (pip install uv) or use "
                     "--env-manager virtualenv")
        run([uv, "venv", env_dir])
        if reqs:
            run([uv, "pip", "install", "--python", os.path.join(env_dir, "bin", "python"),
                 "-r", reqs])
    else:
        run([sys.executable, "-m", "venv"] + ([] if reqs else ["--without-pip"]) + [env_dir])
        if reqs:
            run([os.path.join(env_dir, "bin", "python"), "-m", "pip", "install", "-q", "-r",
                 reqs])
    open(ready, "w").close()
print(json.dumps({"reused": False}))
"""


@dataclass(frozen=True)
class EnvSpec:
    """What defines a project environment, and its content hash."""

    manager: str
    requirements: str  # pip requirement lines ("" for none, or for conda)
    key: str


def env_spec(project_dir: Path, manager: str, host_python_version: str) -> EnvSpec:
    """Read the project's conda.yaml / python_env.yaml and hash it with the manager.

    Raises:
        ConfigError: the project has no environment file the manager can use.
    """
    project_dir = Path(project_dir)
    conda_yaml = project_dir / "conda.yaml"
    python_env = project_dir / "python_env.yaml"
    digest = hashlib.sha256(f"{manager}\0{host_python_version}\0".encode())
    requirements = ""
    if manager == "conda":
        if not conda_yaml.exists():
            raise ConfigError(f"--env-manager conda needs {conda_yaml}; use virtualenv or local")
        digest.update(conda_yaml.read_bytes())
    else:
        from mlflow.utils.environment import _PythonEnv

        if python_env.exists():
            env = _PythonEnv.from_yaml(str(python_env))
        elif conda_yaml.exists():
            env = _PythonEnv.from_conda_yaml(str(conda_yaml))
        else:
            raise ConfigError(f"--env-manager {manager} needs python_env.yaml or conda.yaml in "
                              f"{project_dir}; or use --env-manager local")
        lines = list(env.dependencies or [])
        requirements = "\n".join(lines)
        digest.update(requirements.encode())
        for line in lines:  # `-r requirements.txt` lines: their content defines the env too
            if line.startswith(("-r ", "--requirement ")):
                ref = project_dir / line.split(maxsplit=1)[1].strip()
                if ref.exists():
                    digest.update(ref.read_bytes())
    return EnvSpec(manager, requirements, f"{manager}-{digest.hexdigest()[:16]}")


def prepare(runner: Runner, spec: EnvSpec, python: str, envs_dir: str, project_dir: str,
            run_dir: str) -> dict:
    """Create the environment on the host unless an identical one is ready.

    Returns:
        ``{"python": <env python>, "bin": <env bin dir>, "reused": bool, "path": env_dir}``.

    Raises:
        RemoteError: creation failed; carries the tail of the installer's output.
    """
    env_dir = f"{envs_dir}/{spec.key}"
    reqs = ""
    if spec.requirements:
        reqs = f"{run_dir}/requirements.txt"
        runner.write_file(reqs, spec.requirements.encode())
    proc = runner.run([python, "-c", PREPARE_SOURCE, spec.manager, env_dir, project_dir, reqs],
                      timeout=3600, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or b"").decode(errors="replace")[-3000:]
        raise RemoteError(f"{runner.name}: preparing the {spec.manager} environment {env_dir} "
                          f"failed:\n{tail}")
    reused = json.loads(proc.stdout.decode().strip().splitlines()[-1])["reused"]
    return {"python": f"{env_dir}/bin/python", "bin": f"{env_dir}/bin", "reused": reused,
            "path": env_dir}
