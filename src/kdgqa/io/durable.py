"""Files that survive crashes: atomic replacement, checksummed checkpoints, JSON-lines logs.

* :func:`atomic_write` writes a temp file beside the target, fsyncs it, renames it over the
  target and fsyncs the folder, so a reader sees the old file or the new one, never a mix.
* :func:`save_checkpoint` / :func:`load_checkpoint`: a ``torch.save`` payload behind a one-line
  header ``KDGQA-CHECKPOINT 1 sha256=<hex> size=<bytes>``. Loading checks the header, the size
  and the digest before unpickling, and unpickles with ``weights_only=True`` (no code runs), so
  a truncated, corrupted or foreign file is refused with one line naming the file.
* :func:`append_jsonl` / :func:`read_jsonl`: append-only logs whose last line may be torn by a
  crash; readers ignore an unterminated last line and the next append cuts it off.
* :func:`replace_dir` builds a directory beside its final name and renames it into place.

All of it assumes one writer per file (rank 0 under ``torch.distributed``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from kdgqa.errors import CorruptFileError, KdgqaError, OutputError

__all__ = [
    "CorruptFileError",
    "append_jsonl",
    "atomic_write",
    "clear_stale_temps",
    "load_checkpoint",
    "read_jsonl",
    "remove_stale_temps",
    "replace_dir",
    "save_checkpoint",
    "torch_load_detail",
    "verify_checkpoint",
    "write_new_dir",
]

MAGIC = b"KDGQA-CHECKPOINT"
VERSION = 1
_HEADER = re.compile(rb"KDGQA-CHECKPOINT (\d+) sha256=([0-9a-f]{64}) size=(\d+)\n")
_HEADER_MAX = 160


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable (power loss); not possible on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder; :class:`OutputError` naming ``path`` when a file is in the way."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(path, f"{str(parent)!r} is not a directory")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


def atomic_write(path: str | Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Replace ``path`` with ``chunks`` atomically (temp file, fsync, rename, fsync folder).

    The file gets the umask's permissions; a failure (no space, no permission) raises
    :class:`~kdgqa.errors.OutputError` naming ``path`` and leaves no temp file behind.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        _make_parent(path)
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        _discard(tmp)
        raise OutputError(path, _reason(error)) from None
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


def _discard(tmp: Path) -> None:
    """Remove a temp file if there is one (its folder may not even exist)."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def remove_stale_temps(path: str | Path) -> None:
    """Delete temp files a killed writer of ``path`` left behind (single-writer folders)."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)


def clear_stale_temps(folder: str | Path) -> int:
    """Delete every hidden ``.NAME.tmp-*`` file or folder directly in ``folder`` (what killed
    writers leave); only for a folder whose writer holds it alone. Returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    count = 0
    for stale in folder.glob(".*.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        count += 1
    return count


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` behind a checksummed header, written atomically.

    ``obj`` must load with ``weights_only=True``: tensors, numbers, strings, None and
    lists/tuples/dicts of them (optimizer and scheduler state dicts qualify).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    header = f"KDGQA-CHECKPOINT {VERSION} sha256={digest} size={len(payload)}\n".encode()
    atomic_write(path, (header, payload))


def _verified_payload(path: Path) -> memoryview:
    what = f"checkpoint {str(path)!r}"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CorruptFileError(f"cannot read {what}: {error.strerror or error}") from None
    if not data.startswith(MAGIC):
        raise CorruptFileError(
            f"{what} is not a kdgqa training checkpoint (no {MAGIC.decode()} header): it is "
            "a foreign file or predates checksummed checkpoints; move it away to start that "
            "run afresh")
    match = _HEADER.match(data, 0, _HEADER_MAX)
    if match is None:
        raise CorruptFileError(f"{what} has a damaged header; the file is corrupt: move it "
                               "away to restart the run from scratch")
    version, digest, size = int(match.group(1)), match.group(2).decode(), int(match.group(3))
    if version != VERSION:
        raise CorruptFileError(f"{what} has format version {version}; this kdgqa reads "
                               f"version {VERSION}")
    payload = memoryview(data)[match.end():]
    if len(payload) != size:
        raise CorruptFileError(
            f"{what} is truncated or padded ({len(payload)} of {size} payload bytes): the "
            "file is corrupt; move it away to restart the run from scratch")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CorruptFileError(
            f"{what} fails its sha256 checksum: the file is corrupt; move it away to "
            "restart the run from scratch")
    return payload


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CorruptFileError` unless ``path`` holds an intact checkpoint."""
    _verified_payload(Path(path))


def load_checkpoint(path: str | Path, map_location: Any = None) -> Any:
    """Read what :func:`save_checkpoint` wrote, after checking its size and sha256."""
    path = Path(path)
    payload = _verified_payload(path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:  # a valid digest over a payload torch cannot read
        raise CorruptFileError(f"cannot read checkpoint {str(path)!r}: "
                               f"{torch_load_detail(error)}") from None


def torch_load_detail(error: BaseException) -> str:
    """What to tell a user about a failed weights-only ``torch.load``: torch's first line,
    except when torch's message suggests loading without ``weights_only``, advice that would
    run whatever code the file carries."""
    text = str(error)
    if "weights_only" in text or "Weights only load failed" in text:
        return ("it needs Python objects a weights-only load does not create (not a file "
                "kdgqa wrote, or altered); it was not loaded")
    return (text.strip().splitlines() or [type(error).__name__])[0]


# --------------------------------------------------------------------------- JSON lines

def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines log; an unterminated last line (a torn append) is ignored.

    A complete line that is not a JSON object raises :class:`CorruptFileError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"cannot read {str(path)!r}: {error}") from None
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: after the last newline
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise CorruptFileError(
                f"{str(path)!r} line {number} is not a JSON object: the file is corrupt; "
                "fix or delete that line")
        rows.append(row)
    return rows


def append_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` in one write and fsync; rows of the same ``run_id`` are replaced.

    A run's rows are written when it is committed; if a crash interrupted an earlier commit
    of the same run, its partial rows are dropped first, so no run appears twice. A torn last
    line is cut off before appending.
    """
    path = Path(path)
    if not rows:
        return
    ids = {row.get("run_id") for row in rows} - {None}
    if path.is_file():
        old = read_jsonl(path)
        if any(row.get("run_id") in ids for row in old):
            keep = [json.dumps(row) + "\n" for row in old if row.get("run_id") not in ids]
            atomic_write(path, [line.encode() for line in keep])
        else:
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
    payload = "".join(json.dumps(row) + "\n" for row in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- directories

def _sibling_dir(out: Path) -> Path:
    """A new empty hidden folder beside ``out``, with the umask's permissions (``mkdtemp``
    would make it private, and the rename would keep that)."""
    while True:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def replace_dir(out: str | Path, write: Callable[[Path], Any]) -> None:
    """Run ``write(tmp)`` on a fresh sibling folder, then rename it to ``out`` (replacing it).

    A crash leaves ``out`` as it was or complete; only a hidden ``.NAME.tmp-*`` can remain.
    ``out`` gets the umask's permissions. A failure to write raises
    :class:`~kdgqa.errors.OutputError` naming ``out``, not the temporary folder.
    """
    out = Path(out)
    tmp: Path | None = None
    old: Path | None = None

    def clean() -> None:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)

    try:
        _make_parent(out)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = _sibling_dir(out)
        write(tmp)
        if out.exists():
            old = _sibling_dir(out)
            # A mount point cannot be renamed (EBUSY): then ``old`` is still empty.
            out.rename(old / "previous")
            tmp.rename(out)
            tmp = None
        else:
            tmp.rename(out)
            tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            old = None
    except (OSError, OutputError) as error:
        if old is not None and (old / "previous").exists() and not out.exists():
            (old / "previous").rename(out)  # put the original back before cleaning up
        clean()
        reason = error.reason if isinstance(error, OutputError) else _reason(error)
        raise OutputError(out, reason) from None
    except BaseException:
        clean()
        raise
    _fsync_dir(out.parent)


def write_new_dir(out: str | Path, write: Callable[[Path], Any], *, overwrite: bool = False
                  ) -> None:
    """:func:`replace_dir`, refusing an ``out`` that exists and is not an empty directory
    unless ``overwrite`` (a file in the way is always refused)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KdgqaError(f"output path {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise KdgqaError(f"output directory {str(out)!r} exists and is not empty "
                         "(use --overwrite to replace it)")
    replace_dir(out, write)
