"""The stack's logs: quiet when idle, rotated and capped whatever the servers write."""

from __future__ import annotations

import stat
import time
import urllib.request

import pytest

from tests.net import stack_parts, wait_until

BANNER = "Starting SeaweedFS Mini"


def test_seaweedfs_log_is_quiet_when_idle(stack):
    """No component dials a port that isn't there (the worker used to retry every 5 s)."""
    weed = stack.record("s3").process()
    # The test is this quiet time: weed up for 20 s, several of the old 5 s retry periods.
    time.sleep(max(0.0, 20 - (time.time() - weed.create_time())))
    text = stack.s3.log_path.read_text(errors="replace")
    assert BANNER in text
    current = text.rsplit(BANNER, 1)[1]  # this run of weed only
    refused = [ln for ln in current.splitlines() if "connection refused" in ln]
    assert not refused, refused[:3]


@pytest.fixture
def small_logs():
    """PostgreSQL and mlflow server of a fresh stack whose logs rotate at 32 KiB (2 kept)."""
    sizes = {"workers": 1, "log_max_bytes": 32 * 1024, "log_backups": 2}
    with stack_parts("ffstack-logs-", "postgres", "mlflow", **sizes) as stack:  # /health: no S3
        yield stack


def _fill_postgres(stack, n: int = 120) -> str:
    with stack.postgres.connect() as conn:
        for i in range(n):
            conn.execute(f"DO $$ BEGIN RAISE LOG 'filler {i} %', repeat('x', 4000); END $$")
    return f"filler {n - 1} "


def _fill_mlflow(stack, n: int = 1500) -> str:
    for i in range(n):  # numbered, so the access log's last line is known
        with urllib.request.urlopen(f"{stack.cfg.tracking_uri}/health?n={i}", timeout=10):
            pass
    return f'"GET /health?n={n - 1} HTTP/1.1" 200'


def test_every_log_is_rotated_and_capped(small_logs):
    stack = small_logs
    cap, backups = stack.cfg.log_max_bytes, stack.cfg.log_backups
    last = {stack.postgres.log_path: _fill_postgres(stack),
            stack.mlflow.log_path: _fill_mlflow(stack)}
    for log, last_line in last.items():
        # The log pipes write asynchronously: wait until the newest line is in.
        wait_until(lambda: last_line in log.read_text(errors="replace"),
                   what=f"{last_line!r} in {log.name}", timeout=30)
        files = sorted(log.parent.glob(log.name + "*"))
        names = [f.name for f in files]
        # Filled far past the cap (more than 3 files' worth), yet only the kept files exist.
        assert names == [log.name, f"{log.name}.1", f"{log.name}.2"], names
        sizes = [f.stat().st_size for f in files]
        assert all(s <= cap + 8192 for s in sizes), sizes
        assert sum(sizes) <= (1 + backups) * (cap + 8192), sizes
        assert all(s > cap // 2 for s in sizes[1:]), sizes  # rotated when full, not early
        assert last_line in log.read_text(errors="replace")  # the newest lines are kept
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
