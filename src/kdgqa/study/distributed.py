"""Process-group plumbing for running the same study under ``torchrun``.

One process (the default) and N processes share every code path: ``DistContext`` says who
this process is, reductions are no-ops when alone. Key-driven allocators see the *global*
batch's key norms through ``sync_key_statistics``: each rank sums its local norms and one
all-reduce per layer adds them up (the allocators' ``stats_reducer`` hook),
so every rank picks the same allocation and DGQA buffers stay identical.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdgqa.errors import ConfigError
from kdgqa.schemes.key_driven import set_stats_reducer

__all__ = [
    "DistContext",
    "all_reduce_sum",
    "broadcast_object",
    "init_distributed",
    "shutdown_distributed",
    "sync_key_statistics",
]


@dataclass(frozen=True)
class DistContext:
    """Who this process is: rank, world size and the device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's CUDA device when there is one, else the CPU. A device this
    machine does not have is a :class:`ConfigError` naming it, before anything runs."""
    if name == "auto":
        cuda = torch.cuda.is_available()
        return torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device; expected auto, cpu, cuda or "
                          "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU on this machine (torch "
                              f"{torch.__version__}); use --device cpu or auto")
        index = local_rank if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r}: Apple's MPS backend is not available here; "
                              "use --device cpu or auto")
        return device
    if device.type != "cpu":
        raise ConfigError(f"device {name!r}: kdgqa runs on cpu, cuda or mps")
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL on CUDA, gloo on CPU. Without ``WORLD_SIZE`` > 1 this is a single process and no
    group is created.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world)
    return DistContext(rank, world, local, dev)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor, ctx: DistContext) -> Tensor:
    """Sum ``tensor`` over ranks in place (no-op alone) and return it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_key_statistics(model: nn.Module, ctx: DistContext) -> Callable[[], None]:
    """Make key-driven allocators in ``model`` allocate from the global batch's key norms.

    Installs a sum all-reduce as every key-driven allocator's ``stats_reducer``, so each rank
    sees the norms of the whole global batch, picks the same allocation, and DGQA buffers
    evolve identically. Returns a function that removes the reducers. Does nothing alone.
    """
    if not ctx.distributed:
        return lambda: None

    def reduce(norms: Tensor) -> Tensor:
        return all_reduce_sum(norms.clone(), ctx)

    set_stats_reducer(model, reduce)
    return lambda: set_stats_reducer(model, None)
