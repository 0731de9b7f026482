"""One writer per study directory: a lock file naming the process that holds it.

Two ``kdgqa experiment`` processes writing one output directory would interleave their
results; the second is refused in one line while the first is alive. A lock left behind by a
process that was killed (same host, its pid gone) is taken over. The file is created with
``O_EXCL``, so of two processes taking over the same stale lock one wins and the other is
refused.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from kdgqa.errors import ConfigError

__all__ = ["LOCK_NAME", "study_lock"]

LOCK_NAME = ".kdgqa-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _acquire(path: Path, mine: str) -> None:
    for _ in range(3):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = path.read_text().split()
            except OSError:
                holder = []
            host, pid = (holder[0], int(holder[1])) if len(holder) == 2 and holder[
                1].isdigit() else ("", -1)
            here = socket.gethostname()
            if pid > 0 and host == here and not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # stale: its process is gone
                continue
            who = (f"process {pid} on this machine" if host == here else
                   f"process {pid} on {host}" if host else "an unreadable lock")
            raise ConfigError(
                f"{str(path.parent)!r} is being written by another kdgqa experiment ({who}); "
                f"wait for it to finish, or delete {str(path)!r} if it is gone") from None
        with os.fdopen(handle, "w") as file:
            file.write(mine)
        return
    raise ConfigError(f"cannot take the lock {str(path)!r}: it keeps changing hands")


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock (creating ``out`` if needed) for the duration of the block; a
    directory created here and left empty is removed again on the way out."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    mine = f"{socket.gethostname()} {os.getpid()}"
    _acquire(path, mine)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == mine:
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when nothing was written
