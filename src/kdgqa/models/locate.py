"""Finding the attention layers of a model, whatever its family, and counting what they hold."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ConversionError
from kdgqa.models.base import MHAWeights, ModelFamily
from kdgqa.models.registry import families, family_of, family_of_attention

__all__ = [
    "AttentionLayer",
    "attention_heads",
    "find_attention",
    "grouped_layers",
    "kv_cache_bytes_per_token",
    "read_attention_layer",
    "set_submodule",
]


@dataclass
class AttentionLayer:
    """One convertible multi-head attention of a model: where it is and what it holds."""

    path: str
    module: nn.Module
    family: ModelFamily
    weights: MHAWeights


def read_attention_layer(module: nn.Module, path: str = "") -> AttentionLayer:
    """``module`` (a supported multi-head attention at ``path``) with its family and weights;
    :class:`ConversionError` naming it otherwise."""
    family = family_of_attention(module)
    if family is None:
        raise ConversionError(f"cannot convert module {path or '<root>'!r} of type "
                              f"{type(module).__qualname__}: not a supported attention layout")
    return AttentionLayer(path, module, family, family.read_attention(module, path or "<root>"))


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


def find_attention(model: nn.Module) -> list[AttentionLayer]:
    """Every convertible self-attention of ``model``, in module order, or raise.

    Attention a family keeps as it is (:meth:`ModelFamily.keeps`, e.g. a pooling head) is
    skipped. Raises :class:`ConversionError` naming the first module that looks like
    attention but is not a supported layout (or is a supported class configured in a way
    kdgqa cannot reproduce), and when nothing convertible is found at all. Nothing is
    modified.
    """
    found: list[AttentionLayer] = []
    kept: list[str] = []
    for path, module in model.named_modules():
        skipped = [*kept, *(layer.path for layer in found)]
        if any(path.startswith(prefix + ".") for prefix in skipped):
            continue
        if any(family.keeps(module) for family in families()):
            kept.append(path)
            continue
        label = path or "<root>"
        if isinstance(module, GroupedQueryAttention):
            raise ConversionError(
                f"module {label!r} is already a GroupedQueryAttention; convert the original "
                "multi-head model instead"
            )
        if family_of_attention(module) is not None:
            found.append(read_attention_layer(module, path))
        elif _looks_like_attention(module):
            supported = " and ".join(f.supported for f in families())
            raise ConversionError(
                f"cannot convert module {label!r} of type {type(module).__qualname__}: "
                f"supported attention layouts are {supported}"
            )
    owner = family_of(model)
    for family in {layer.family for layer in found} | ({owner} if owner else set()):
        family.check_model(model, [layer.path for layer in found if layer.family is family])
    if not found:
        raise ConversionError(
            f"no convertible self-attention found in {type(model).__qualname__}; expected "
            "a model of one of the families " + ", ".join(f.name for f in families())
        )
    return found


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in ``model`` (``path`` as ``named_modules`` spells it)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def grouped_layers(model: nn.Module) -> Iterator[tuple[str, GroupedQueryAttention]]:
    """``(path, module)`` for every :class:`GroupedQueryAttention` in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, GroupedQueryAttention):
            yield path, module


def attention_heads(model: nn.Module) -> int:
    """The query heads of ``model``'s first attention layer (MHA or grouped)."""
    for _, module in model.named_modules():
        if isinstance(module, GroupedQueryAttention):
            return module.num_heads
        family = family_of_attention(module)
        if family is not None:
            return family.read_attention(module, "").num_heads
    raise ConversionError(f"{type(model).__qualname__} has no attention layer kdgqa can read")


def kv_cache_bytes_per_token(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V bytes one token occupies in an inference cache, summed over layers."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, GroupedQueryAttention):
            total += module.kv_cache_bytes_per_token(dtype)
            continue
        family = family_of_attention(module)
        if family is not None:
            weights = family.read_attention(module, "")
            total += 2 * weights.num_heads * weights.head_dim * size
    return total
