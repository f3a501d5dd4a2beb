"""The slow pass's order: each file's tests together, the longest files first (SLOW_SECONDS)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import BIN, ROOT, slow_seconds


def test_slow_files_are_collected_longest_first_each_in_one_piece():
    proc = subprocess.run([str(BIN / "python"), "-m", "pytest", "--collect-only", "-q",
                           "-m", "slow", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [line.split("::", 1)[0] for line in proc.stdout.splitlines() if "::" in line]
    assert len(files) > 20, proc.stdout[-2000:]
    runs = [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]
    assert len(runs) == len(set(runs)), f"a file's slow tests are split: {runs}"
    seconds = [slow_seconds(Path(f)) for f in runs]
    assert seconds == sorted(seconds, reverse=True), list(zip(runs, seconds))
    assert seconds[0] > 30  # the table is read (30 s: a file it does not list)
