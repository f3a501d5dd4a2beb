"""Which data path a run takes: the decoded in-memory cache when this process's part of the set
fits the memory budget, else streaming (decoded again every epoch).

    plan = choose_data_path("auto", train_images=200, val_images=80, image_size=224,
                            device=torch.device("cpu"), budget_gb=0, local_processes=1)
    plan.path, plan.reason   # "cache", "auto: this process's 200 training + 80 validation ..."

The budget is ``-P memory_budget_gb`` when given (per process), else 60 % of the host's
available memory shared by the node's processes (CPU), or 50 % of the GPU's free memory
(CUDA: the caches live there; the model, activations and optimizer need the rest).
``-P data_path=cache`` or ``stream`` skips the choice; a forced cache that does not fit the
budget is refused before anything is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fowlflow.errors import DataError
from fowlflow.trainer.image_cache import bytes_per_image

HOST_SHARE = 0.6  # of the host's available memory the caches of its processes may take
GPU_SHARE = 0.5   # of the GPU's free memory the caches may take


@dataclass(frozen=True)
class DataPlan:
    path: str          # "cache" or "stream"
    reason: str        # one sentence: the sizes, the budget, the choice
    need_bytes: int    # this process's decoded images
    budget_bytes: int
    asked: str = "auto"  # -P data_path

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.budget_bytes


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_budget(device: torch.device, budget_gb: float, local_processes: int
                  ) -> tuple[int, str]:
    """This process's budget for decoded images in bytes, and where it comes from."""
    if budget_gb > 0:
        return int(budget_gb * 2**30), f"-P memory_budget_gb={budget_gb:g}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE), f"{GPU_SHARE:.0%} of the GPU's {_size(free)} free"
    import psutil

    available = psutil.virtual_memory().available
    share = f" over {local_processes} processes on this node" if local_processes > 1 else ""
    return (int(available * HOST_SHARE / local_processes),
            f"{HOST_SHARE:.0%} of the host's {_size(available)} available{share}")


def choose_data_path(mode: str, train_images: int, val_images: int, image_size: int,
                     device: torch.device, budget_gb: float, local_processes: int) -> DataPlan:
    """The data path for ``-P data_path=mode`` and this process's part of the set."""
    need = (train_images * bytes_per_image("train", image_size)
            + val_images * bytes_per_image("val", image_size))
    budget, where = memory_budget(device, budget_gb, local_processes)
    sizes = (f"this process's {train_images} training + {val_images} validation images take "
             f"{_size(need)} decoded; the budget is {_size(budget)} ({where})")
    if mode in ("stream", "cache"):
        return DataPlan(mode, f"-P data_path={mode}: {sizes}", need, budget, mode)
    if need <= budget:
        return DataPlan("cache", f"auto: {sizes}: it fits, decoded once and cached", need, budget)
    return DataPlan("stream", f"auto: {sizes}: it does not fit, decoded every epoch", need, budget)


def agree(plans: list[DataPlan], rank: int) -> DataPlan:
    """The plan every rank takes, from all ranks' plans: streaming if any rank streams (the
    ranks' budgets may differ by a little), so the ranks don't take different paths.

    Raises:
        DataError: a forced cache does not fit some rank's budget.
    """
    mine = plans[rank]
    for other, plan in enumerate(plans):
        if plan.asked == "cache" and not plan.fits:
            raise DataError(
                f"-P data_path=cache, but the cache does not fit (rank {other}: "
                f"{plan.reason.split(': ', 1)[1]}). Leave -P data_path=auto (it streams what "
                "does not fit), use -P data_path=stream, raise -P memory_budget_gb, or use a "
                "smaller -P image_size.")
    if mine.path == "cache" and any(p.path == "stream" for p in plans):
        return DataPlan("stream", f"{mine.reason}; but another rank's part does not fit, so "
                        "every rank streams", mine.need_bytes, mine.budget_bytes, mine.asked)
    return mine
