"""Turn a pretrained multi-head ViT (timm or Hugging Face) into a grouped-query one in place.

Every supported self-attention module is swapped for a :class:`GroupedQueryAttention` whose
query and output projections are the original ones, bit for bit, and whose K/V heads are
pooled from the original heads of each contiguous group (mean pooling, as in GQA uptraining).
Schemes that choose their groups from data (``calibrated``, ``similarity``) have them planned
by :mod:`kdgqa.calibration`; their query heads and output-projection columns are permuted
together so each group is contiguous. Nothing else in the model is touched. Anything that
looks like attention but is not a layout a model family (:mod:`kdgqa.models`) can read is
reported by name *before* the model is modified, so a conversion happens completely or not
at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.calibration.plan import RECORDED, GroupPlan, plan_groups
from kdgqa.conversion.pooling import check_pooling, pool_heads
from kdgqa.errors import ConversionError, SchemeError
from kdgqa.models.locate import AttentionLayer, find_attention, set_submodule
from kdgqa.schemes.registry import SCHEMES, scheme_class

__all__ = ["RECORDED", "build_replacement", "convert"]


def build_replacement(
    layer: AttentionLayer,
    scheme: str,
    num_kv_heads: int,
    pooling: str,
    scheme_options: dict[str, Any],
    groups: Sequence[Sequence[int]] | None = None,
) -> GroupedQueryAttention:
    """The grouped module that replaces ``layer``: queries and output projection copied
    (permuted so each of ``groups`` is a contiguous run, when given), K/V pooled per group."""
    weights = layer.weights
    heads, head_dim = weights.num_heads, weights.head_dim
    options: dict[str, Any] = dict(
        qkv_bias=weights.q_bias is not None,
        attn_drop=weights.attn_drop,
        proj_drop=weights.proj_drop,
        head_dim=head_dim,
        proj_bias=weights.o_bias is not None,
        **scheme_options,
    )
    new = layer.family.grouped_attention(layer.module, weights, num_kv_heads, scheme, options)
    ref = weights.q_weight
    new.to(device=ref.device)
    new.qkv.to(dtype=ref.dtype)
    new.proj.to(dtype=ref.dtype)
    # With groups (calibrated schemes) query heads are permuted so each group is a
    # contiguous run, and the output projection's input columns with them: the same function.
    order = None if groups is None else [h for group in groups for h in group]

    def queries(t: Tensor) -> Tensor:
        return t if order is None else t.reshape(heads, -1, *t.shape[1:])[order].reshape(t.shape)

    def pool(t: Tensor) -> Tensor:
        return pool_heads(t, heads, num_kv_heads, pooling, groups)

    o_weight = weights.o_weight
    if order is not None:
        o_weight = o_weight.reshape(o_weight.shape[0], heads, head_dim)[:, order]
    with torch.no_grad():
        new.qkv.weight.copy_(torch.cat(
            [queries(weights.q_weight), pool(weights.k_weight), pool(weights.v_weight)]))
        if weights.q_bias is not None:
            assert weights.k_bias is not None and weights.v_bias is not None
            new.qkv.bias.copy_(torch.cat(
                [queries(weights.q_bias), pool(weights.k_bias), pool(weights.v_bias)]))
        new.proj.weight.copy_(o_weight.reshape(weights.o_weight.shape))
        if weights.o_bias is not None:
            new.proj.bias.copy_(weights.o_bias)
    if groups is not None:
        allocator: Any = new.allocator
        allocator.set_groups([len(g) for g in groups], order)
    new.train(layer.module.training)
    return new


def _planned_groups(
    model: nn.Module,
    layers: list[AttentionLayer],
    scheme: str,
    num_kv_heads: int,
    calibration: Any,
    scheme_options: dict[str, Any],
    build: Callable[[AttentionLayer, list[list[int]]], nn.Module],
) -> dict[str, GroupPlan]:
    """Check ``calibration`` against the scheme; measure and plan groups where it asks."""
    needs = scheme_class(scheme).needs_calibration
    if isinstance(calibration, str) and calibration == RECORDED:
        return {}
    if needs and calibration is None:
        raise ConversionError(
            f"scheme {scheme!r} needs calibration=...: images (N, C, H, W) normalised like "
            "the model's inputs, or an iterable of such batches"
        )
    if calibration is None:
        return {}
    if not needs:
        users = ", ".join(n for n, c in SCHEMES.items() if c.needs_calibration)
        raise ConversionError(f"calibration is only used by schemes {users}, not {scheme!r}")
    request = None
    for layer in layers:  # the options and G on every layer, before running the model
        try:
            allocator = scheme_class(scheme)(layer.weights.num_heads, num_kv_heads,
                                             **scheme_options)
        except ValueError as error:
            raise ConversionError(f"cannot convert module {layer.path!r}: {error}") from None
        request = request or allocator.calibration_request()
    if request is None:
        raise SchemeError(f"scheme {scheme!r} needs calibration but returns no "
                          "calibration_request()")
    by_path = {layer.path: layer for layer in layers}
    return plan_groups(model, layers, num_kv_heads, calibration, request,
                       build=lambda path, groups: build(by_path[path], groups))


def convert(
    model: nn.Module,
    scheme: str,
    num_kv_heads: int,
    pooling: str = "mean",
    *,
    calibration: Any = None,
    **scheme_options: Any,
) -> nn.Module:
    """Replace every self-attention of ``model`` by a grouped-query one; return ``model``.

    ``scheme`` is any of :func:`kdgqa.available_schemes`; ``num_kv_heads`` (G) must fit every
    layer (``gqa`` needs H % G == 0; key-driven schemes accept uneven contiguous groups).
    All checks run before the first module is replaced, so on error the model is unchanged.
    The conversion settings are kept on ``model.kdgqa_conversion`` for saving.

    Schemes that choose their groups from data (``calibrated``, ``similarity``) need
    ``calibration``: images ``(N, C, H, W)`` normalised like the model's inputs, or an
    iterable of such batches (``(images, labels)`` pairs too); at most the scheme's
    ``calibration_images`` are used. The model is run on them in eval mode, each layer's
    groups are chosen (:mod:`kdgqa.calibration`), query heads are permuted so groups are
    contiguous and each KV head is pooled from its own group; the plans are kept on
    ``model.kdgqa_conversion["calibration"]``. ``calibration="recorded"`` builds the
    structure only, for a state dict that holds the allocation (how checkpoints reload).
    """
    check_pooling(pooling)
    if model is None or not isinstance(model, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(model).__qualname__}")
    try:
        scheme_class(scheme)
    except SchemeError as error:
        raise ConversionError(str(error)) from None
    layers = find_attention(model)
    heads = sorted({layer.weights.num_heads for layer in layers})

    def build(layer: AttentionLayer, groups: Sequence[Sequence[int]] | None) -> nn.Module:
        try:
            return build_replacement(layer, scheme, num_kv_heads, pooling,
                                     dict(scheme_options), groups)
        except ConversionError:
            raise
        except ValueError as error:
            raise ConversionError(f"cannot convert module {layer.path!r}: {error}") from None

    plans = _planned_groups(model, layers, scheme, num_kv_heads, calibration, scheme_options,
                            build)
    # Build every replacement first: scheme or G errors surface before the model changes.
    replacements = [(layer.path, build(layer, plans[layer.path].groups if plans else None))
                    for layer in layers]
    for path, new in replacements:
        set_submodule(model, path, new)
    first: Any = replacements[0][1]
    conversion: dict[str, Any] = {
        "scheme": scheme,
        "num_kv_heads": num_kv_heads,
        "num_heads": heads[0] if len(heads) == 1 else heads,
        "pooling": pooling,
        "scheme_options": dict(first.scheme_options),
        "layers": [path for path, _ in replacements],
    }
    if first.allocator.needs_calibration:
        # Reloading rebuilds the structure only; the allocation is in the state dict.
        conversion["scheme_options"]["calibration"] = RECORDED
    if plans:
        conversion["calibration"] = {
            path: {"groups": plan.groups, "loss": plan.loss,
                   "contiguous_loss": plan.contiguous_loss,
                   "candidate_errors": plan.candidate_errors}
            for path, plan in plans.items()
        }
    setattr(model, "kdgqa_conversion", conversion)  # noqa: B010 (nn.Module attribute typing)
    return model
