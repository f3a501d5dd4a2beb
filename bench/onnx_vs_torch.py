"""onnxruntime vs PyTorch eager on this CPU: batch-1 latency, batch-32 throughput, parity.

    .venv/bin/python bench/onnx_vs_torch.py                 # the recorded run (a few minutes)
    .venv/bin/python bench/onnx_vs_torch.py --quick         # smoke test of the script

Same model and inputs on both sides, in one process: torchvision ResNet18 (random weights,
2-class head) at 224 px, wrapped exactly as the registry exports it
(:class:`fowlflow.registry.export.PixelClassifier`: uint8 RGB pixels in, logits +
probabilities out), exported with :func:`fowlflow.registry.export.export_onnx`. Inputs are
real photos (hymenoptera val + the turkey) preprocessed by
:func:`fowlflow.data.images.preprocess`. PyTorch runs the eager ``nn.Module`` in float32
under ``torch.inference_mode``; onnxruntime runs the CPU execution provider with its default
graph optimizations. Both use every core. Timings are medians over repeated runs after warm-up.
Not a test: results go to docs/benchmarks.md ("Registry: ONNX vs PyTorch").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets"


def timed(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def photos(n: int) -> list[Path]:
    files = sorted((DATA / "hymenoptera_data" / "val").rglob("*.jpg"))
    step = max(1, len(files) // n)
    return [DATA / "fowl_sample" / "turkey.jpg", *files[::step]][:n]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 px, few repeats: check the script")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()

    import onnxruntime as ort
    import torch
    import torchvision

    from fowlflow.registry.export import PixelClassifier, export_onnx
    from fowlflow.data.images import Preprocessing, preprocess
    from fowlflow.registry.parity import compare, onnx_probabilities, torch_probabilities

    size = 64 if args.quick else 224
    reps1, reps32, warm = (5, 2, 1) if args.quick else (50, 10, 3)
    prep = Preprocessing(image_size=size, resize_size=round(size * 256 / 224))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    classifier = PixelClassifier(model, prep).eval()
    pixels = np.stack([preprocess(f, prep) for f in photos(64)])
    batch1, batch32 = pixels[:1], pixels[:32]

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(classifier, onnx_path, prep)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        parity = compare(torch_probabilities(classifier, pixels),
                         onnx_probabilities(onnx_path, pixels))

    def run_torch(x):
        t = torch.from_numpy(x)
        with torch.inference_mode():
            classifier(t)

    def run_ort(x):
        session.run(["probabilities"], {"pixels": x})

    results = {}
    for name, fn in (("pytorch_eager", run_torch), ("onnxruntime", run_ort)):
        lat = timed(lambda: fn(batch1), reps1, warm)
        thr = timed(lambda: fn(batch32), reps32, warm)
        results[name] = {"batch1_latency_ms_median": 1000 * statistics.median(lat),
                         "batch1_latency_ms_p90": 1000 * float(np.percentile(lat, 90)),
                         "batch32_images_per_s": 32 / statistics.median(thr)}
    speedup = (results["onnxruntime"]["batch32_images_per_s"]
               / results["pytorch_eager"]["batch32_images_per_s"])
    latency_ratio = (results["pytorch_eager"]["batch1_latency_ms_median"]
                     / results["onnxruntime"]["batch1_latency_ms_median"])
    report = {
        "model": f"resnet18, 2 classes, {size} px, float32, uint8 pixels in",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": str(torch.__version__), "torch_threads": torch.get_num_threads(),
                    "onnxruntime": ort.__version__},
        "results": results,
        "throughput_speedup_ort_over_torch": speedup,
        "batch1_latency_speedup_ort_over_torch": latency_ratio,
        "parity": {"images": parity.images, "top1_agreement": parity.top1_agreement,
                   "max_abs_prob_diff": parity.max_abs_prob_diff},
        "repeats": {"batch1": reps1, "batch32": reps32, "warmup": warm},
    }
    print(json.dumps(report, indent=2))
    print(f"\n| runtime | batch 1 latency (median / p90) | batch 32 throughput |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['batch1_latency_ms_median']:.1f} / {r['batch1_latency_ms_p90']:.1f} ms"
              f" | {r['batch32_images_per_s']:.1f} images/s |")
    print(f"\nonnxruntime / PyTorch: throughput x{speedup:.2f}, batch-1 latency x{latency_ratio:.2f}"
          f"; parity on {parity.images} photos: top-1 {parity.top1_agreement:.0%}, "
          f"max |dp| {parity.max_abs_prob_diff:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
