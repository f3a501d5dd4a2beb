"""Copy a server's output (stdin) into a log file that is rotated and capped in size.

The stack starts one of these next to each server, reading the server's stdout and stderr
through a pipe, so every log is bounded (``max_bytes`` x ``1 + backups``) whatever the server
writes, with the standard library's :class:`logging.handlers.RotatingFileHandler`::

    python -m fowlflow.server.logpipe logs/mlflow.log 10485760 3 < server-output

It ignores SIGINT/SIGTERM/SIGHUP: it exits when the last writer closes the pipe, so a server's
last words on shutdown are kept.
"""

from __future__ import annotations

import logging
import logging.handlers
import signal
import sys

MAX_LINE = 64 * 1024  # a longer line is split, so one record never exceeds the cap much


def main(argv: list[str] | None = None) -> int:
    path, max_bytes, backups = (argv if argv is not None else sys.argv[1:])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=int(max_bytes),
                                                   backupCount=int(backups), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("fowlflow.logpipe")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for line in iter(lambda: sys.stdin.buffer.readline(MAX_LINE), b""):
        logger.info(line.decode("utf-8", "backslashreplace").rstrip("\n"))
    handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
