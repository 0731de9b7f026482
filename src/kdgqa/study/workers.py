"""Independent grid runs in parallel worker processes, with the results of a serial loop.

Each worker (a fresh ``spawn`` process, so nothing of the parent's threads or state leaks in)
receives the study's config, the MHA model the grid starts from and the data once, then takes
runs from a shared queue. A run depends only on its seed, never on which worker runs it or
when, so the outputs are the same as one process's; they are handed back in grid order, and
the parent process stays the only one that writes the study's files. An error stops the grid
where one process would have stopped: after every earlier run is handed back, with the first
failing run's error; a worker that dies is reported by its exit code.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdgqa.study.config import parse_config
from kdgqa.study.data import DataSplits
from kdgqa.study.distributed import DistContext
from kdgqa.study.runs import RunOutput, RunSpec, execute_run

__all__ = ["GridWorkerError", "WorkerJob", "WorkerPool"]

#: Seconds between checks that every worker is still alive while waiting for results.
POLL_SECONDS = 1.0


class GridWorkerError(RuntimeError):
    """A worker process died (killed, out of memory) before handing back its runs."""


@dataclass(frozen=True)
class WorkerJob:
    """What every worker needs for any run of the grid."""

    config: dict[str, Any]
    base: nn.Module
    splits: DataSplits
    env: dict[str, Any]
    resume: bool
    threads: int
    reset_classifier: int | None = None


def _worker(jobs: Any, tasks: Any, results: Any) -> None:
    # Ctrl-C is the parent's to answer: ignored here, then unblocked (it was blocked since
    # the process started, see WorkerPool.__enter__), so one that arrived meanwhile is dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    payload: bytes | None = jobs.get()
    if payload is None:
        return
    job: WorkerJob = pickle.loads(payload)
    torch.set_num_threads(job.threads)
    config = parse_config(job.config)
    config.progress = False  # one bar per process would interleave on the terminal
    ctx = DistContext(device=torch.device("cpu"))
    while (task := tasks.get()) is not None:
        index, label, spec = task
        try:
            output = execute_run(config, job.base, job.splits, spec, label=label, env=job.env,
                                 resume=job.resume, ctx=ctx,
                                 reset_classifier=job.reset_classifier)
        except Exception as error:  # handed to the parent, which raises it
            results.put(("error", index, error))
            return
        results.put(("done", index, output))


class WorkerPool:
    """``workers`` processes, started on entry; :meth:`run` hands them the grid. With fewer
    than two workers nothing is started and :meth:`run` is not available."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._context = mp.get_context("spawn")
        self._jobs: Any = None
        self._tasks: Any = None
        self._results: Any = None
        self._processes: list[Any] = []

    def __enter__(self) -> WorkerPool:
        if self.workers >= 2:
            self._jobs = self._context.Queue()
            self._tasks, self._results = self._context.Queue(), self._context.Queue()
            self._processes = [
                self._context.Process(target=_worker, args=(self._jobs, self._tasks,
                                                            self._results),
                                      daemon=True, name=f"kdgqa-grid-{i}")
                for i in range(self.workers)]
            # Started with Ctrl-C blocked: the calling thread's signal mask is inherited
            # across fork and exec, so a worker cannot be interrupted while it imports and
            # unpickles; it then ignores Ctrl-C for good (see _worker). The parent answers it
            # for the whole process group and stops the workers. Its own handler is left as
            # it is: a Ctrl-C meanwhile reaches it (through any of its threads, the handler
            # being process-wide), and ignoring it here instead could lose it (a thread that
            # does not block it would take it and discard it).
            can_block = hasattr(signal, "pthread_sigmask")
            if can_block:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                for process in self._processes:
                    process.start()
                if can_block:  # a Ctrl-C that waited is answered here, inside the try
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            except BaseException:
                if can_block:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                self.__exit__()  # a Ctrl-C while starting: stop what was started
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        started = [p for p in self._processes if p.pid is not None]  # a Ctrl-C can cut a start
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join()
        if self._processes:
            for channel in (self._jobs, self._tasks, self._results):
                # Whatever is still unsent (a killed worker's model copy, runs never taken)
                # is dropped: waiting to flush it into a pipe nobody reads would hang.
                channel.cancel_join_thread()
                channel.close()
            # Drop the queues now: kept alive by a traceback until exit, their semaphores
            # would be reported as leaked by multiprocessing's resource tracker.
            self._jobs = self._tasks = self._results = None
        self._processes = []

    def run(self, job: WorkerJob, todo: list[tuple[str, RunSpec]]) -> Iterator[RunOutput]:
        """Run ``todo`` (label, spec) in the workers; yield outputs in ``todo`` order."""
        if not self._processes:
            raise RuntimeError("WorkerPool.run needs a started pool of two or more workers")
        for index, (label, spec) in enumerate(todo):
            self._tasks.put((index, label, spec))
        # Plain pickle, by value: every worker gets its own copy, and nothing is shared that
        # would have to be cleaned up when a worker is stopped on another's error.
        payload = pickle.dumps(job)
        for _ in self._processes:
            self._jobs.put(payload)
            self._tasks.put(None)
        finished: dict[int, RunOutput] = {}
        errors: dict[int, BaseException] = {}
        following = 0
        while following < len(todo):
            if errors and following == min(errors):
                # Every run before the first failed one is done and handed back: the study
                # stops where one process would have stopped, with the same error.
                raise errors[following]
            # Checked at every turn: while other workers keep handing back runs, a dead one's
            # run would otherwise be waited for forever.
            dead = [p for p in self._processes if p.exitcode not in (None, 0)]
            if dead:
                raise GridWorkerError(
                    f"grid worker {dead[0].name} stopped with exit code {dead[0].exitcode} "
                    "before finishing its runs; finished runs are kept, continue with --resume")
            try:
                kind, index, payload = self._results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if kind == "error":
                errors[index] = payload
            else:
                finished[index] = payload
            while following in finished:
                yield finished.pop(following)
                following += 1
