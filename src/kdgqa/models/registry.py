"""The model families kdgqa knows, and which one a model, module or record belongs to."""

from __future__ import annotations

from torch import nn

from kdgqa.errors import SourceError
from kdgqa.models.base import ModelFamily

__all__ = [
    "families",
    "family_for_library",
    "family_of",
    "family_of_attention",
    "register_model_family",
]

_FAMILIES: list[ModelFamily] = []


def register_model_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` known to conversion, checkpoints, export and fidelity; return it.

    Families are asked in registration order; a library name may be served by one family.
    """
    if not isinstance(family, ModelFamily):
        raise SourceError(f"register_model_family expects a ModelFamily instance, got "
                          f"{family!r}")
    if any(f.library == family.library and type(f) is not type(family) for f in _FAMILIES):
        raise SourceError(f"a model family for library {family.library!r} is registered "
                          "already")
    if not any(type(f) is type(family) for f in _FAMILIES):
        _FAMILIES.append(family)
    return family


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in the order they are asked."""
    return tuple(_FAMILIES)


def family_of(model: nn.Module) -> ModelFamily | None:
    """The family that owns ``model`` (the whole model), if any."""
    return next((f for f in _FAMILIES if f.owns(model)), None)


def family_of_attention(module: nn.Module) -> ModelFamily | None:
    """The family that can read ``module`` as a multi-head attention, if any."""
    return next((f for f in _FAMILIES if f.is_attention(module)), None)


def family_for_library(library: object) -> ModelFamily:
    """The family that rebuilds base-model records of ``library``; ``SourceError`` if none."""
    for family in _FAMILIES:
        if family.library == library:
            return family
    known = ", ".join(repr(f.library) for f in _FAMILIES)
    raise SourceError(f"unknown base library {library!r}; expected one of {known}")
