"""Distributed state, taken only from torchrun's environment.

    dist_ctx = DistContext.from_env()   # RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK
    dist_ctx.init()                     # gloo on CPU, nccl on CUDA; no-op for one process

Without torchrun everything is rank 0 of a world of 1, on the best local device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistContext":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("WORLD_SIZE", 1)), int(env.get("GROUP_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def init(self) -> None:
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.device())
            dist.init_process_group(backend=backend)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` for one process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def local_world_size(self) -> int:
        """The processes on this node (torchrun's ``LOCAL_WORLD_SIZE``): they share its memory."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.distributed else 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
