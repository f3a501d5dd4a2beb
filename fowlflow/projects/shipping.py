"""Copy a project's files to a host: rsync when both ends have it, else a tar stream over ssh.

    method = ship_project(Path(work_dir), runner, "/home/a/.fowlflow/runs/ID/project")  # "rsync"
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

from fowlflow.errors import RemoteError
from fowlflow.projects.runners import SshRunner, tail_text


def project_files(work_dir: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files of a git project, else every file but .git."""
    work_dir = Path(work_dir)
    if shutil.which("git"):
        proc = subprocess.run(["git", "-C", str(work_dir), "ls-files", "-z", "--cached",
                               "--others", "--exclude-standard"], capture_output=True)
        if proc.returncode == 0:
            names = [n for n in proc.stdout.decode().split("\0") if n]
            return sorted(n for n in names if (work_dir / n).is_file())
    return sorted(str(p.relative_to(work_dir)) for p in work_dir.rglob("*")
                  if p.is_file() and ".git" not in p.relative_to(work_dir).parts)


def ship_project(work_dir: Path, runner: SshRunner, dest: str, method: str = "auto",
                 remote_rsync: bool = True) -> str:
    """Copy the project's files (see :func:`project_files`) into ``dest`` on the host.

    rsync is used when both ends have it (``method="auto"``), else a tar stream over ssh.

    Returns:
        the method used, "rsync" or "tar".
    """
    files = project_files(work_dir)
    use_rsync = method == "rsync" or (method == "auto" and remote_rsync
                                      and shutil.which("rsync") is not None)
    runner.run(["mkdir", "-p", "-m", "700", dest])
    if use_rsync:
        _rsync(Path(work_dir), files, runner, dest)
        return "rsync"
    _tar(Path(work_dir), files, runner, dest)
    return "tar"


def _rsync(work_dir: Path, files: list[str], runner: SshRunner, dest: str) -> None:
    rsh = shlex.join(["ssh", *runner.options])
    cmd = ["rsync", "-a", "--from0", "--files-from=-", "-e", rsh, f"{work_dir}/",
           f"{runner.host.destination}:{dest}/"]
    proc = subprocess.run(cmd, input="\0".join(files).encode(), capture_output=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RemoteError(f"rsync of {work_dir} to {runner.name}:{dest} failed "
                          f"({proc.returncode}): {tail_text(proc.stderr)}")


def _tar(work_dir: Path, files: list[str], runner: SshRunner, dest: str) -> None:
    proc = runner.popen(["tar", "-x", "-f", "-", "-C", dest], stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
            for name in files:
                tar.add(work_dir / name, arcname=name, recursive=False)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    code = proc.wait(timeout=600)
    reader.join(10)
    if code != 0:
        raise RemoteError(f"copying {work_dir} to {runner.name}:{dest} with tar failed "
                          f"({code}): {tail_text(b''.join(err))}")
