"""Where and with what a run ran: tags for git commit, library versions and the device.

    tags = lineage_tags(device)   # {"git_commit": ..., "torch_version": ..., "device_name": ...}
"""

from __future__ import annotations

import platform
import socket
import subprocess

import torch


def git_commit(cwd: str = ".") -> tuple[str, bool] | None:
    """The HEAD commit of the git work tree at ``cwd`` and whether it has local changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def lineage_tags(device: torch.device) -> dict[str, str]:
    import torchvision

    tags = {
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "cuda_version": str(torch.version.cuda) if device.type == "cuda" else "none (cpu)",
        "device": device.type,
        "device_name": device_name(device),
        "host": socket.gethostname(),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"], tags["git_dirty"] = commit[0], str(commit[1]).lower()
    return tags
