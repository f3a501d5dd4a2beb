"""``fowlflow data ...``: the data sub-commands of the ``fowlflow`` CLI (docs/data.md).

    fowlflow data pack hymenoptera_data s3://data/hymenoptera-shards --shard-size 1000
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    data = sub.add_parser("data", help="data sets: pack an ImageFolder into shards (docs/data.md)",
                          description="Data sets for training (docs/data.md).")
    commands = data.add_subparsers(dest="data_command", required=True)
    pack = commands.add_parser(
        "pack", help="write an ImageFolder as WebDataset shards that -P data= streams",
        description="Write the ImageFolder SRC (a folder, .zip, s3:// folder or http(s) .zip: "
                    "anything -P data= takes) as WebDataset shards plus an index "
                    "(fowlflow-shards.json: class names, counts, sha256 per shard) to DEST, a "
                    "folder or s3://bucket/prefix. Unreadable images are reported and left out. "
                    "Train on the result with -P data=DEST.")
    pack.add_argument("src", metavar="SRC", help="the ImageFolder: folder, .zip, s3://, URL")
    pack.add_argument("dest", metavar="DEST", help="a folder or s3://bucket/prefix")
    pack.add_argument("--shard-size", type=_positive, default=1000, metavar="N",
                      help="at most N images per shard (default 1000); use a size that gives "
                           "each split at least as many shards as ranks x loader workers")
    pack.add_argument("--workers", type=_positive, default=None, metavar="N",
                      help="threads that read and decode-check images (default: one per CPU)")
    pack.add_argument("--overwrite", action="store_true",
                      help="replace the shard set DEST already holds")
    pack.set_defaults(func=_pack)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of images >= 1, got {text!r}")
    return int(text)


def _pack(args) -> int:
    from fowlflow.data.pack import pack

    index = pack(args.src, args.dest, shard_size=args.shard_size, overwrite=args.overwrite,
                 workers=args.workers)
    shards = {s: len(v) for s, v in index.shards.items()}
    print(f"Packed {index.counts['train']} train and {index.counts['val']} val images "
          f"({shards['train']} + {shards['val']} shards, {len(index.classes)} classes, data "
          f"digest {index.digest}) into {index.location}; "
          f"{len(index.skipped)} file(s) left out. Train on it with -P data={index.location}")
    return 0
