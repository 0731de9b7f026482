"""Schemes by name: the one table that ``GroupedQueryAttention``, ``convert``, checkpoints,
export, configs and the CLI read.

A scheme is a :class:`~kdgqa.schemes.base.QueryAllocator` subclass with a unique ``name``;
decorating it with :func:`register_scheme` is all it takes to make it available everywhere.
Schemes in other packages are found through the ``kdgqa.schemes`` entry-point group (each
entry point names a module whose import registers its schemes), loaded once, the first time
the table is read, so ``kdgqa experiment`` and ``kdgqa convert`` see them too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any, TypeVar

from kdgqa.errors import SchemeError
from kdgqa.schemes.base import QueryAllocator

__all__ = [
    "ENTRY_POINT_GROUP",
    "SCHEMES",
    "available_schemes",
    "build_allocator",
    "register_scheme",
    "scheme_class",
    "validate_cell",
]

#: Entry-point group through which other packages contribute schemes.
ENTRY_POINT_GROUP = "kdgqa.schemes"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")

Allocator = TypeVar("Allocator", bound=type[QueryAllocator])


class _SchemeTable(Mapping[str, type[QueryAllocator]]):
    """Read-only view of the registered schemes, in registration order."""

    def __init__(self) -> None:
        self._classes: dict[str, type[QueryAllocator]] = {}
        self._plugins_loaded = False

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # before importing: a plugin registers through us
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as error:  # a broken plugin is named, never half-registered
                detail = " ".join(str(error).split()) or type(error).__name__
                raise SchemeError(f"scheme plugin {entry.name!r} ({entry.value}) failed to "
                                  f"load: {detail}") from None

    def add(self, cls: type[QueryAllocator]) -> None:
        self._classes[cls.name] = cls

    def __getitem__(self, name: str) -> type[QueryAllocator]:
        self._load_plugins()
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(list(self._classes))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._classes)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._classes


#: Every registered scheme by name (read-only; add with :func:`register_scheme`).
SCHEMES: Mapping[str, type[QueryAllocator]] = _SchemeTable()


def register_scheme(cls: Allocator) -> Allocator:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere in kdgqa.

    The name must be new, lower case (letters, digits, ``.``, ``_``, ``-``). Raises
    :class:`~kdgqa.errors.SchemeError` otherwise.
    """
    table = SCHEMES
    assert isinstance(table, _SchemeTable)
    if not (isinstance(cls, type) and issubclass(cls, QueryAllocator)):
        raise SchemeError(f"register_scheme expects a QueryAllocator subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise SchemeError(f"{cls.__qualname__} needs its own class attribute name = '...' "
                          f"(lower case letters, digits, '.', '_', '-'), got {name!r}")
    taken = table._classes.get(name)
    if taken is not None and taken is not cls:
        raise SchemeError(f"scheme name {name!r} is taken by {taken.__module__}."
                          f"{taken.__qualname__}; pick another name")
    table.add(cls)
    return cls


def available_schemes() -> list[str]:
    """Names accepted by ``GroupedQueryAttention(scheme=...)`` and ``kdgqa.convert``."""
    return list(SCHEMES)


def scheme_class(scheme: str) -> type[QueryAllocator]:
    """The class registered under ``scheme``; :class:`SchemeError` naming the valid ones."""
    if isinstance(scheme, str) and scheme in SCHEMES:
        return SCHEMES[scheme]
    raise SchemeError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")


def build_allocator(
    scheme: str, num_heads: int, num_kv_heads: int, **options: Any
) -> QueryAllocator:
    """Instantiate the allocator registered under ``scheme``."""
    return scheme_class(scheme)(num_heads, num_kv_heads, **options)


def validate_cell(scheme: str, num_heads: int, num_kv_heads: int,
                  options: Mapping[str, Any] | None = None) -> type[QueryAllocator]:
    """Check that ``scheme`` with ``options`` fits ``num_heads`` query and ``num_kv_heads``
    KV heads, exactly as building it would; return its class or raise :class:`SchemeError`.

    The one check behind configs, ``--dry-run``, preflight and ``convert``.
    """
    cls = scheme_class(scheme)
    try:
        cls(num_heads, num_kv_heads, **dict(options or {}))
    except SchemeError:
        raise
    except (TypeError, ValueError) as error:  # a plugin's own validation
        raise SchemeError(f"scheme {scheme!r}: {' '.join(str(error).split())}") from None
    return cls
