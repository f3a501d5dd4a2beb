"""The idle watchdog each ec2 instance runs (standard library only; installed by user data).

User data writes this file to ``/usr/local/bin/fowlflow-autostop`` and starts it as a systemd
service: every ``--interval`` seconds it looks for a fowlflow supervisor process (a run on this
machine); after ``--idle-minutes`` without one it runs ``--shutdown`` (``shutdown -h now``).
The instance is launched with shutdown behaviour ``terminate``, so it is then gone and no longer
billed, even when the laptop that launched it was closed::

    fowlflow-autostop --idle-minutes 30
    python ec2_autostop.py --idle-minutes 0.01 --interval 0.2 --shutdown "touch /tmp/down"
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

MARKER = "fowlflow-supervise"  # the supervisor's file name on the hosts


def busy(marker: str = MARKER) -> bool:
    """Whether a process whose command line names ``marker`` runs on this machine."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    return True
        except OSError:
            continue
    return False


def watch(idle_s: float, interval: float, shutdown: list[str], marker: str = MARKER) -> int:
    """Loop until the machine was idle for ``idle_s`` seconds, then run ``shutdown``."""
    idle_since = time.monotonic()
    while True:
        if busy(marker):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle_s:
            print(f"fowlflow-autostop: idle for {idle_s / 60:.1f} min; running "
                  f"{shlex.join(shutdown)}", flush=True)
            return subprocess.call(shutdown)
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fowlflow-autostop", description=__doc__.split("\n")[0])
    parser.add_argument("--idle-minutes", type=float, required=True)
    parser.add_argument("--interval", type=float, default=30, help="seconds between checks")
    parser.add_argument("--shutdown", default="shutdown -h now", help="the command to run")
    parser.add_argument("--marker", default=MARKER, help="a command-line word that means busy")
    args = parser.parse_args(argv)
    return watch(args.idle_minutes * 60, args.interval, shlex.split(args.shutdown),
                 args.marker)


if __name__ == "__main__":
    sys.exit(main())
