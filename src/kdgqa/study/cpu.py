"""How a study uses the CPU: intra-op threads and worker processes, chosen on purpose.

Torch's default (one intra-op thread per core) slows a small model down: its kernels are too
short to split, and on a machine other jobs share, the extra threads wait for cores (the
measurements are in docs/experiments.md). The thread count also changes results: some CPU
kernels (SDPA, LayerNorm and patch-embedding backward) split their reductions by thread, so
a seeded run is bitwise reproducible only at a fixed count. So a study fixes it: by default
one thread for models below :data:`SMALL_MODEL_PARAMETERS`, torch's default above.

The cores are then used across runs instead: the grid's runs are independent, so a small
model's grid runs in worker processes (:mod:`kdgqa.study.workers`), each on one thread, with
results identical to running them one after another.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = [
    "MIN_PARALLEL_RUNS",
    "SMALL_MODEL_PARAMETERS",
    "available_cores",
    "choose_cpu_threads",
    "choose_workers",
    "cpu_threads",
]

#: Below this many parameters a model trains on one CPU thread unless the config says otherwise.
SMALL_MODEL_PARAMETERS = 5_000_000
#: Fewer runs than this are not worth starting worker processes for (each imports torch).
MIN_PARALLEL_RUNS = 6


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def choose_workers(requested: int, threads: int | None, runs: int) -> tuple[int, str]:
    """Worker processes for ``runs`` grid runs (``requested`` 0 = automatic) and why.

    Automatic, when training runs on one CPU thread and there are at least
    :data:`MIN_PARALLEL_RUNS` runs: one more worker than available cores, so a core that
    frees up always finds a run ready, also when other jobs share the machine (measured in
    docs/experiments.md); else the runs happen in this process.
    """
    if requested > 0:
        return min(requested, max(runs, 1)), "cpu_workers in the config"
    cores = available_cores()
    if threads != 1 or runs < MIN_PARALLEL_RUNS or cores < 2:
        return 1, "automatic: in this process"
    return min(cores + 1, runs), (f"automatic: one more than the {cores} available cores, each "
                                  "run on one thread; results do not depend on the count")
