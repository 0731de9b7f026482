"""How many CPU threads a study's training uses, chosen on purpose.

Torch's default (one intra-op thread per core) slows a small model down: its kernels are too
short to split, and on a machine other jobs share, the extra threads wait for cores (measured
on two shared cores with two busy processes beside it: 1 thread 800-1,400 img/s, 2 threads
130-250 img/s for the default digits ViT). The thread count also changes results: some CPU
kernels (SDPA, LayerNorm and patch-embedding backward) split their reductions by thread, so
a seeded run is bitwise reproducible only at a fixed count. So a study fixes it: by default
one thread for models below :data:`SMALL_MODEL_PARAMETERS`, torch's default above.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["SMALL_MODEL_PARAMETERS", "choose_cpu_threads", "cpu_threads"]

#: Below this many parameters a model trains on one CPU thread unless the config says otherwise.
SMALL_MODEL_PARAMETERS = 5_000_000


def choose_cpu_threads(requested: int, parameters: int) -> tuple[int, str]:
    """The thread count for ``requested`` (0 = automatic) and a model of ``parameters``,
    with the reason, for the log."""
    if requested > 0:
        return requested, "cpu_threads in the config"
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1, (f"automatic: a {parameters:,}-parameter model runs fastest on one thread, "
                   "and a fixed count keeps results bitwise reproducible")
    count = torch.get_num_threads()
    return count, (f"automatic: torch's default for a {parameters:,}-parameter model; set "
                   "cpu_threads to fix it for bitwise reproducibility")


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
