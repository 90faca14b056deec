"""torch.distributed set-up for ``torchrun`` (gloo on the CPU, nccl on CUDA) and small helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1), else a single process.

    ``device``: "auto" (CUDA when available, one GPU per local rank), "cpu" or "cuda".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks in place (a no-op alone)."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list:
    """Every rank's ``obj`` (``[obj]`` alone)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_counts(local: dict[str, dict[str, int]], info: DistInfo) -> dict[str, dict[str, int]]:
    """Nested counts (``{group: {key: n}}``) summed over ranks; every rank gets the sum."""
    merged: dict[str, dict[str, int]] = {}
    for counts_of_rank in all_gather_objects(local, info):
        for group, counts in counts_of_rank.items():
            for key, n in counts.items():
                merged.setdefault(group, {}).setdefault(key, 0)
                merged[group][key] += n
    return merged


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op alone)."""
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (a no-op alone or when it is already gone)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
