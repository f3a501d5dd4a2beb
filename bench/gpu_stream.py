"""The streaming path with JPEGs decoded on the GPU (nvjpeg), in batches: images/s of ResNet18
training, batch 256, bf16 (not a test; needs an NVIDIA GPU).

    .venv/bin/python bench/gpu_stream.py --help
    .venv/bin/python bench/gpu_stream.py [--data DIR] [--images 20000] [--batch-size 256]

The target (issue 14): >= 8,000 img/s on one H200, where the decode ceiling measured before
was 7,492 img/s (nvjpeg, batch 256, decode alone) and the bare training step 13,075 img/s.
What it does, per batch: DataLoader workers read the files' encoded bytes (no decoding on the
CPU); ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes the whole batch at once on a
side CUDA stream, one batch ahead of training (``--overlap``, on by default), so nvjpeg's
work hides behind the previous batch's forward/backward; each image is squashed to the
trainer's ``resize_size`` on the GPU (bilinear, antialiased) keeping its aspect ratio, and the
trainer's own batched augmentation (:func:`fowlflow.trainer.augment.train_batch`) and a
bf16 channels_last ResNet18 step follow. The file list is the ImageFolder's training images
repeated up to ``--images`` (hymenoptera has only 244), in the trainer's epoch order
(:mod:`fowlflow.trainer.sharding`). Three numbers: decode alone, the bare step on random
tensors, and the whole streamed step. Writes ``$OUT/gpu_stream.json`` (else
``bench/results/gpu_stream.json``) and prints a markdown table.

Without CUDA it stops with exit status 2 and says so (``--device cpu`` runs the same
pipeline on the CPU, slowly, to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera_data"
TARGET = 8_000  # img/s, one H200
DECODE_CEILING = 7_492  # img/s measured before: nvjpeg at batch 256, decode alone


class EncodedFiles:
    """Item ``i``: the encoded bytes of file ``i`` (read in a worker; plain ``bytes`` cross
    to the training process through the pipe, not one shared-memory file per tensor)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        return self.paths[i].read_bytes()


def collate(items: list[bytes]) -> list[bytes]:
    return items


def squash(images: list, side: int):
    """Decoded CHW uint8 images of any size -> uint8 (B, 3, side, side) and their w/h."""
    import torch
    import torch.nn.functional as F

    aspect = torch.tensor([im.shape[2] / im.shape[1] for im in images],
                          device=images[0].device)
    out = torch.stack([
        F.interpolate(im[None].float(), size=(side, side), mode="bilinear",
                      antialias=True, align_corners=False)[0] for im in images])
    return out.round_().clamp_(0, 255).to(torch.uint8), aspect


def decode(batch: list[bytes], device, side: int):
    import torch
    import torchvision

    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch]
    images = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB,
                                        device=device)
    return squash(images, side)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for what is measured.")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="an ImageFolder of JPEGs (default: the shared hymenoptera set)")
    p.add_argument("--images", type=int, default=20_000,
                   help="training files per epoch (the set's list repeated up to this)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=8, help="processes reading the files")
    p.add_argument("--steps", type=int, default=60, help="measured steps (after 10 warm-up)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="decode on the training stream instead of one batch ahead on a side "
                        "stream")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check only)")
    args = p.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_stream.py: no CUDA device here; this benchmark needs an NVIDIA GPU "
              "(nvjpeg). Run it on a GPU machine, or with --device cpu to check the script.",
              file=sys.stderr)
        return 2
    if not (args.data / "train").is_dir():
        p.error(f"--data {args.data}: no train/ folder; give an ImageFolder of JPEGs")

    import torchvision

    from fowlflow.data.imagefolder import scan_imagefolder
    from fowlflow.trainer.augment import train_batch
    from fowlflow.trainer.image_cache import resize_size
    from fowlflow.trainer.sharding import epoch_batches

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    side = resize_size(args.image_size)
    layout = scan_imagefolder(args.data)
    jpegs = [(pth, lab) for pth, lab in zip(layout.train.paths, layout.train.labels)
             if pth.suffix.lower() in (".jpg", ".jpeg")]
    files = [jpegs[i % len(jpegs)] for i in range(args.images)]
    order = torch.cat(epoch_batches(len(files), len(files), args.batch_size, 42, 1)).tolist()
    paths = [files[i][0] for i in order]
    labels = torch.tensor([files[i][1] for i in order], device=device)
    loader = torch.utils.data.DataLoader(
        EncodedFiles(paths), batch_size=args.batch_size, num_workers=args.workers,
        collate_fn=collate, drop_last=True, persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers else None)
    steps = min(args.steps + 10, len(loader))
    if steps <= 10:
        p.error(f"--images {args.images} gives {len(loader)} batches; need more than 10")

    model = torchvision.models.resnet18(num_classes=len(layout.classes))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(x_uint8, aspect, y):
        x = train_batch(x_uint8, aspect, args.image_size, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(work, feed) -> float:
        """images/s of ``work(next(feed))``: the median of the steps after 10 warm-ups, the
        feed's own time (reading files in workers) left out."""
        times = []
        for i in range(steps):
            item = next(feed)
            start = time.perf_counter()
            work(item)
            sync()
            if i >= 10:
                times.append(time.perf_counter() - start)
        return args.batch_size / statistics.median(times)

    # 1. Decode alone (read in workers, decode + squash on the device).
    decode_ips = timed(lambda batch: decode(batch, device, side), iter(loader))

    # 2. The bare step on random uint8 images already on the device.
    fake = torch.randint(0, 256, (args.batch_size, 3, side, side), dtype=torch.uint8,
                         device=device)
    aspect = torch.full((args.batch_size,), 4 / 3, device=device)
    y = labels[:args.batch_size]
    bare_ips = timed(lambda _: step(fake, aspect, y), iter(range(steps)))

    # 3. The streamed step: batch k+1 decoded on a side stream while batch k trains.
    side_stream = torch.cuda.Stream(device) if cuda and args.overlap else None
    it = iter(loader)

    def next_decoded():
        batch = next(it)
        if side_stream is None:
            return decode(batch, device, side), None
        with torch.cuda.stream(side_stream):
            out = decode(batch, device, side)
            done = torch.cuda.Event()
            done.record(side_stream)
        return out, done

    ahead = next_decoded()
    sync()
    start = time.perf_counter()
    for i in range(steps):
        (images, asp), done = ahead
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
            images.record_stream(torch.cuda.current_stream(device))
            asp.record_stream(torch.cuda.current_stream(device))
        if i + 1 < steps:
            ahead = next_decoded()
        step(images, asp, labels[i * args.batch_size:(i + 1) * args.batch_size])
        if i == 9:
            sync()
            start = time.perf_counter()
    sync()
    stream_ips = (steps - 10) * args.batch_size / (time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    result = {"device": name, "batch_size": args.batch_size, "image_size": args.image_size,
              "workers": args.workers, "overlap": bool(side_stream), "steps": steps - 10,
              "decode_images_per_sec": decode_ips, "bare_step_images_per_sec": bare_ips,
              "streamed_images_per_sec": stream_ips, "target": TARGET,
              "decode_ceiling_before": DECODE_CEILING, "meets_target": stream_ips >= TARGET}
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_stream.json").write_text(json.dumps(result, indent=2))
    print(f"| {name} | decode alone | bare step | streamed step (target {TARGET:,}) |")
    print("|---|---|---|---|")
    print(f"| ResNet18 bf16, batch {args.batch_size}, {args.image_size} px, {args.workers} "
          f"readers | {decode_ips:,.0f} img/s | {bare_ips:,.0f} img/s | "
          f"{stream_ips:,.0f} img/s |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
