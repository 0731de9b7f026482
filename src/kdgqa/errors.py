"""The errors kdgqa raises on input it cannot use, under one base class.

Every one of them is a :class:`KdgqaError` (a ``ValueError``): catch that to handle any bad
config, scheme, model, checkpoint, dataset or file in one place. Each message is one line that
names what is wrong and what was expected; the CLI prints it as ``kdgqa: error: ...`` and exits
with status 2. This module imports nothing, so every layer of the package can use it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "CorruptFileError",
    "DatasetError",
    "ExportError",
    "KdgqaError",
    "OutputError",
    "SchemeError",
    "SourceError",
]


class KdgqaError(ValueError):
    """Base of every error kdgqa raises on bad input; the message is one line."""


class SchemeError(KdgqaError):
    """An allocation scheme, its options or its head counts are invalid."""


class ConversionError(KdgqaError):
    """A model (or part of it) cannot be converted; the message names the module."""


class ExportError(KdgqaError):
    """A model has no fixed MHA equivalent, or its base model cannot be rebuilt."""


class SourceError(KdgqaError):
    """A model source cannot be resolved or loaded; the message says which and why."""


class CheckpointError(SourceError):
    """A kdgqa checkpoint directory is missing, malformed or fails its checksums."""


class CorruptFileError(KdgqaError):
    """A file is truncated, corrupted or not what it should be; the message says what to do."""


class OutputError(KdgqaError):
    """A file or directory the user asked for cannot be written; the message names that path
    (never a temporary sibling) and the reason, e.g. no space left or no permission."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"cannot write {str(path)!r}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[OutputError], tuple[object, str]]:
        return OutputError, (self.path, self.reason)  # rebuilt in a parent process


class ConfigError(KdgqaError):
    """A configuration problem, described in one line that names the offending key."""


class DatasetError(ConfigError):
    """The dataset is missing or not in the expected layout (the message names the layout)."""
