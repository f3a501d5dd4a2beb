"""A real unprivileged account on this machine, for tests that must not run with root's rights.

The suite runs as root, who may read and write anything. ``ensure_local_user`` creates the
account (``useradd``, once); ``as_user`` prefixes a command so it runs under that account's
uid and gid, with no supplementary groups.
"""

from __future__ import annotations

import pwd
import subprocess

PROBE_USER = "ffprobe"


def ensure_local_user(name: str = PROBE_USER) -> str:
    """The account ``name``, created as a system user without home or shell if missing."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", name], capture_output=True, text=True)
        try:
            pwd.getpwnam(name)  # made by us, or meanwhile by another test process
        except KeyError:
            raise RuntimeError(f"useradd {name} failed: {made.stderr.strip()}") from None
    return name


def as_user(user: str, argv: list[str], read_all: bool = False) -> list[str]:
    """``argv`` run as ``user`` (needs root).

    ``read_all``: keep only CAP_DAC_READ_SEARCH, so the command reads files and searches folders
    it otherwise could not (the interpreter behind the venv lives under root's 0700 home) while
    every write is still checked against the user's own permissions.
    """
    entry = pwd.getpwnam(user)
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] if read_all else []
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
            *caps, "--", *argv]
