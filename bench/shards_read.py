"""Benchmark: read throughput of fowlflow shards (not a test).

    .venv/bin/python bench/shards_read.py --data ../shared/datasets/hymenoptera_data

Packs ``--data`` (train + val) with ``fowlflow data pack`` into a folder and into a SeaweedFS
S3 bucket on loopback (the team stack's server, started here and stopped after), then reads
each split with one reader (``iter_split``: world size 1, each shard's sha256 checked before
use) ``--repeats`` times: the median seconds, images/s and MB/s, next to reading the same
ImageFolder files as bytes. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera_data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what pack keeps (the .gif is left out)


def _median_rate(read, repeats: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        size, count = read()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return seconds, count / seconds, size / seconds / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an ImageFolder")
    parser.add_argument("--shard-size", type=int, default=100, help="images per shard")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from fowlflow.data.pack import pack
    from fowlflow.data.shards import iter_split, open_shards
    from fowlflow.server.config import Secrets, StackConfig
    from fowlflow.server.seaweedfs import SeaweedFS

    tmp = Path(tempfile.mkdtemp(prefix="fowlflow-bench-shards-"))
    cfg = StackConfig.load(tmp / "state", pick_free=True)
    server = SeaweedFS(cfg, Secrets.load_or_create(cfg.secrets_dir))
    record = server.start()
    rows = []
    try:
        os.environ.update(server.s3_env())
        server.client().create_bucket(Bucket="data")
        places = {"folder": str(tmp / "shards"), "SeaweedFS S3": "s3://data/shards"}
        for name, dest in places.items():
            start = time.perf_counter()
            pack(args.data, dest, shard_size=args.shard_size, progress=False)
            rows.append((f"pack to {name}", time.perf_counter() - start, None, None))
        files = sorted(p for p in Path(args.data).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES)

        def read_files():
            return sum(len(p.read_bytes()) for p in files), len(files)

        def read_shards(location):
            index, count, size = open_shards(location), 0, 0
            for split in ("train", "val"):
                for _key, data, _label in iter_split(index, split):
                    count, size = count + 1, size + len(data)
            return size, count

        rows.append(("ImageFolder files", *_median_rate(read_files, args.repeats)))
        for name, dest in places.items():
            rows.append((f"shards, {name}",
                         *_median_rate(lambda d=dest: read_shards(d), args.repeats)))
    finally:
        server.stop(record)
        shutil.rmtree(tmp, ignore_errors=True)
    print("| what | seconds | images/s | MB/s |\n|---|---|---|---|")
    for name, seconds, rate, mbs in rows:
        print(f"| {name} | {seconds:.2f} | {'' if rate is None else f'{rate:.0f}'} | "
              f"{'' if mbs is None else f'{mbs:.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
