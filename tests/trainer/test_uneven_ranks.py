"""DDP with a rank that has no images for some steps: streamed files that all failed to decode
in one batch, or a shard stream that ran short. Two real gloo ranks train one epoch of the
trainer's loop; rank 1's batches hold an empty one and end two steps early. Before the loop
sent zero gradients for such steps, rank 0 waited forever in its next backward."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta

import torch

from tests.net import free_port

STEPS, BATCH, SIZE = 5, 4, 32


class _Batches:
    """``train_batches`` as the data paths hand it out: rank 1's third batch is empty and its
    stream stops after the third (two steps short)."""

    def __init__(self, rank: int):
        self.rank = rank

    def train_batches(self, setup, epoch: int):
        from fowlflow.trainer.image_cache import resize_size

        side = resize_size(SIZE)
        gen = torch.Generator().manual_seed(100 * self.rank + epoch)

        def batch(n: int):
            return (torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen),
                    torch.full((n,), 4 / 3), torch.randint(0, 2, (n,), generator=gen))

        if self.rank == 0:
            items = [batch(BATCH) for _ in range(STEPS)]
        else:
            items = [batch(BATCH), batch(BATCH), batch(0)]
        return [BATCH] * STEPS, iter(items)


def _weights_digest(model: torch.nn.Module) -> str:
    """The parameters' digest (BatchNorm's running statistics are left out: DDP copies rank
    0's at the start of each forward, so after the last step each rank holds its own)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torchvision

    from fowlflow.trainer.distributed import DistContext
    from fowlflow.trainer.loop import LoopSetup, train_epoch

    # A short collective timeout: a rank left waiting fails the test in 30 s, not never.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=30))
    try:
        ctx = DistContext(rank=rank, local_rank=rank, world_size=2)
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=2).to(memory_format=torch.channels_last)
        before = _weights_digest(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        setup = LoopSetup(torch.device("cpu"), ctx, BATCH, SIZE, 2, 0, False, progress=False)
        stats = train_epoch(ddp, optimizer, _Batches(rank), setup, epoch=1)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"before": before, "after": _weights_digest(model),
                       "images": stats.images}, f)
    finally:
        dist.destroy_process_group()


def test_a_rank_without_images_for_some_steps_keeps_step_with_the_others(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["after"] == ranks[1]["after"] != ranks[0]["before"]  # replicas still equal
    assert ranks[0]["images"] == ranks[1]["images"] == STEPS * BATCH + 2 * BATCH
