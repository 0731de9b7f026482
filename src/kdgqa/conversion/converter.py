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
from kdgqa.calibration.measure import InputMoments, first_images, measure
from kdgqa.calibration.partition import contiguous_groups
from kdgqa.calibration.plan import RECORDED, GroupPlan, plan_groups
from kdgqa.conversion.align import align_heads
from kdgqa.conversion.fit import fitted_kv
from kdgqa.conversion.options import DATA_POOLING, FIT_CALIBRATION_IMAGES
from kdgqa.conversion.pooling import check_pooling, pool_heads
from kdgqa.errors import ConversionError, SchemeError
from kdgqa.models.locate import AttentionLayer, find_attention, set_submodule
from kdgqa.models.timm_pool import ATTENTION_POOL_CHOICES, grouped_attention_pools
from kdgqa.schemes.registry import SCHEMES, scheme_class

__all__ = ["RECORDED", "build_replacement", "convert"]


def build_replacement(
    layer: AttentionLayer,
    scheme: str,
    num_kv_heads: int,
    pooling: str,
    scheme_options: dict[str, Any],
    groups: Sequence[Sequence[int]] | None = None,
    moments: InputMoments | None = None,
    align: bool = False,
) -> GroupedQueryAttention:
    """The grouped module that replaces ``layer``: queries and output projection copied
    (permuted so each of ``groups`` is a contiguous run, when given), K/V pooled per group.

    ``moments`` (the layer's calibration input moments) are needed by ``pooling="fit"`` and
    by ``align``, which first rotates every head into its group's common basis."""
    weights = layer.weights
    heads, head_dim = weights.num_heads, weights.head_dim
    if (align or pooling in DATA_POOLING) and moments is None:
        raise ConversionError(f"pooling {pooling!r}" + (" with align" if align else "") +
                              " needs calibration moments of the layer")
    new = layer.family.grouped_attention(layer.module, weights, num_kv_heads, scheme,
                                         _module_options(weights, scheme_options))
    # Validated by the module above: the groups each KV head is pooled from.
    members = ([list(g) for g in groups] if groups is not None else
               contiguous_groups(heads, num_kv_heads))
    if align:
        assert moments is not None
        weights = align_heads(weights, moments, members)
    ref = weights.q_weight
    new.to(device=ref.device)
    new.qkv.to(dtype=ref.dtype)
    new.proj.to(dtype=ref.dtype)
    # With groups (calibrated schemes) query heads are permuted so each group is a
    # contiguous run, and the output projection's input columns with them: the same function.
    order = None if groups is None else [h for group in groups for h in group]

    def queries(t: Tensor) -> Tensor:
        return t if order is None else t.reshape(heads, -1, *t.shape[1:])[order].reshape(t.shape)

    if pooling in DATA_POOLING:
        assert moments is not None
        k_weight, k_bias, v_weight, v_bias = fitted_kv(weights, moments, members)
    else:
        k_weight, v_weight = (pool_heads(t, heads, num_kv_heads, pooling, groups)
                              for t in (weights.k_weight, weights.v_weight))
        k_bias, v_bias = (None if t is None else pool_heads(t, heads, num_kv_heads, pooling,
                                                             groups)
                          for t in (weights.k_bias, weights.v_bias))

    o_weight = weights.o_weight
    if order is not None:
        o_weight = o_weight.reshape(o_weight.shape[0], heads, head_dim)[:, order]
    with torch.no_grad():
        new.qkv.weight.copy_(torch.cat([queries(weights.q_weight), k_weight, v_weight]))
        if weights.q_bias is not None:
            assert k_bias is not None and v_bias is not None
            new.qkv.bias.copy_(torch.cat([queries(weights.q_bias), k_bias, v_bias]))
        new.proj.weight.copy_(o_weight.reshape(weights.o_weight.shape))
        if weights.o_bias is not None:
            new.proj.bias.copy_(weights.o_bias)
    if groups is not None:
        allocator: Any = new.allocator
        allocator.set_groups([len(g) for g in groups], order)
    new.train(layer.module.training)
    return new


def _module_options(weights: Any, scheme_options: dict[str, Any]) -> dict[str, Any]:
    """Constructor options of the grouped module that replaces an MHA with ``weights``."""
    return dict(qkv_bias=weights.q_bias is not None, attn_drop=weights.attn_drop,
                proj_drop=weights.proj_drop, head_dim=weights.head_dim,
                proj_bias=weights.o_bias is not None, **scheme_options)


def _planned_groups(
    model: nn.Module,
    layers: list[AttentionLayer],
    scheme: str,
    num_kv_heads: int,
    calibration: Any,
    scheme_options: dict[str, Any],
    build: Callable[[AttentionLayer, list[list[int]]], nn.Module],
    data_pooling: bool = False,
) -> dict[str, GroupPlan]:
    """Check ``calibration`` against the scheme; measure and plan groups where it asks.
    ``data_pooling``: the pooling itself needs calibration (``fit``, ``align``)."""
    needs = scheme_class(scheme).needs_calibration
    if isinstance(calibration, str) and calibration == RECORDED:
        return {}
    if (needs or data_pooling) and calibration is None:
        why = f"scheme {scheme!r}" if needs else "this pooling"
        raise ConversionError(
            f"{why} needs calibration=...: images (N, C, H, W) normalised like "
            "the model's inputs, or an iterable of such batches"
        )
    if calibration is None:
        return {}
    if not needs:
        if data_pooling:
            return {}
        users = ", ".join(n for n, c in SCHEMES.items() if c.needs_calibration)
        raise ConversionError(f"calibration is only used by schemes {users}, by "
                              f"pooling {', '.join(DATA_POOLING)} and by align, not by "
                              f"{scheme!r} with this pooling")
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
    align: bool = False,
    attention_pool: str = "keep",
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

    ``pooling="fit"`` solves each group's K/V from calibration images so the layer stays
    closest to MHA (:mod:`kdgqa.conversion.fit`); ``align=True`` first rotates every head
    into its group's common basis, which leaves the MHA function unchanged
    (:mod:`kdgqa.conversion.align`). Both need ``calibration`` (every scheme; at most
    ``calibration_images`` of a calibrated scheme, else 512 images), measured on the
    original model in one pass.

    ``attention_pool``: timm's attention-pooling head (``AttentionPoolLatent``, one latent query,
    no KV cache) stays multi-head with ``"keep"`` (the default); ``"gqa"`` gives it G K/V
    heads pooled from contiguous groups (:mod:`kdgqa.models.timm_pool`).
    """
    check_pooling(pooling)
    if attention_pool not in ATTENTION_POOL_CHOICES:
        raise ConversionError(f"attention_pool must be one of {', '.join(ATTENTION_POOL_CHOICES)}"
                              f", got {attention_pool!r}")
    if not isinstance(align, bool):
        raise ConversionError(f"align must be True or False, got {align!r}")
    data_pooling = align or pooling in DATA_POOLING
    recorded = isinstance(calibration, str) and calibration == RECORDED
    if model is None or not isinstance(model, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(model).__qualname__}")
    try:
        scheme_class(scheme)
    except SchemeError as error:
        raise ConversionError(str(error)) from None
    count = scheme_options.get("calibration_images", FIT_CALIBRATION_IMAGES)
    if data_pooling and "calibration_images" in scheme_options and not (
            scheme_class(scheme).needs_calibration):
        # Not an option of this scheme: how many images the fit/alignment measures.
        count = scheme_options.pop("calibration_images")
    if data_pooling and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConversionError(f"calibration_images must be an integer >= 1, got {count!r}")
    layers = find_attention(model)
    normed = next((layer.path for layer in layers if layer.weights.key_norm), None)
    if data_pooling and normed is not None:
        what = "align" if align else f"pooling {pooling!r}"
        raise ConversionError(f"{what} cannot be used on module {normed!r}: it normalises its "
                              "keys (qk-norm), which rotations and fitted keys ignore; use "
                              "pooling 'mean', 'first' or 'random' without align")
    heads = sorted({layer.weights.num_heads for layer in layers})
    if (data_pooling or scheme_class(scheme).needs_calibration) and not recorded:
        for layer in layers:
            reason = layer.family.data_pooling_reason(model, layer.module)
            if reason:
                what = (f"scheme {scheme!r}" if scheme_class(scheme).needs_calibration
                        else "align" if align else f"pooling {pooling!r}")
                raise ConversionError(
                    f"cannot convert module {layer.path!r} with {what}: its {reason} makes "
                    "the calibration objective inexact; use mean pooling of contiguous groups")

    moments: dict[str, InputMoments] = {}

    def build(layer: AttentionLayer, groups: Sequence[Sequence[int]] | None) -> nn.Module:
        # Rebuilding from a checkpoint (recorded): the state dict holds the pooled weights.
        fitted = data_pooling and not recorded
        try:
            return build_replacement(layer, scheme, num_kv_heads,
                                     pooling if fitted or pooling not in DATA_POOLING else "mean",
                                     dict(scheme_options), groups,
                                     moments.get(layer.path), align and fitted)
        except ConversionError:
            raise
        except ValueError as error:
            raise ConversionError(f"cannot convert module {layer.path!r}: {error}") from None

    if data_pooling and not recorded and calibration is not None:
        if not isinstance(calibration, Tensor):
            # An iterator is read once: keep its batches for the group planning too.
            planned = scheme_options.get("calibration_images", scheme_class(
                scheme).option_defaults.get("calibration_images", 0))
            needed = max(count, int(planned) if isinstance(planned, int) else 0)
            calibration = first_images(calibration, needed)
        # Measured on the original model, before a calibrated scheme plans (and tries) groups.
        moments.update(measure(model, [(layer.path, layer.module) for layer in layers],
                               calibration, count))
    plans = _planned_groups(model, layers, scheme, num_kv_heads, calibration, scheme_options,
                            build, data_pooling)
    # Build every replacement first: scheme or G errors surface before the model changes.
    replacements = [(layer.path, build(layer, plans[layer.path].groups if plans else None))
                    for layer in layers]
    pools = (grouped_attention_pools(model, num_kv_heads) if attention_pool == "gqa" else [])
    for path, new in [*replacements, *pools]:
        set_submodule(model, path, new)
    first: Any = replacements[0][1]
    conversion: dict[str, Any] = {
        "scheme": scheme,
        "num_kv_heads": num_kv_heads,
        "num_heads": heads[0] if len(heads) == 1 else heads,
        "pooling": pooling,
        "align": align,
        "attention_pool": attention_pool,
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
