"""Turn a pretrained multi-head ViT (timm or Hugging Face) into a grouped-query one in place.

Every supported self-attention module is swapped for a :class:`GroupedQueryAttention` whose
query and output projections are the original ones, bit for bit, and whose K/V heads are
pooled from the original heads of each contiguous group (mean pooling, as in GQA uptraining).
Calibrated schemes choose the groups from data instead (``kdgqa.calibrate``); their query
heads and output-projection columns are permuted together so each group is contiguous.
Nothing else in the model is touched. Anything that looks like attention but is not a layout
we know how to convert is reported by name *before* the model is modified, so a conversion
either happens completely or not at all.

Supported layouts (read from the installed libraries, never from version strings):

* timm ``Attention`` (fused ``qkv`` Linear, optional qkv/proj bias, any head dim), found in
  ``timm.layers`` (1.0.2x+) or ``timm.models.vision_transformer`` (early 1.0.x); variants
  with qk-norm, scale-norm, a gate or a different output width are refused.
* transformers ``ViTAttention``: the nested layout of 4.x and early 5.x
  (``attention.{query,key,value}`` + ``output.dense``) and the flat layout of later 5.x
  (``q_proj/k_proj/v_proj/o_proj``). The replacement returns what the installed ``ViTLayer``
  expects: a tuple ``(out,)``/``(out, None)`` (4.40-4.56), a tensor (4.57-5.0x) or
  ``(out, None)`` (flat layout).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.allocation import even_counts
from kdgqa.attention import GroupedQueryAttention

__all__ = [
    "POOLING_METHODS",
    "ConversionError",
    "HFViTGroupedAttention",
    "MHAWeights",
    "convert",
    "find_attention",
    "pool_heads",
    "read_mha_weights",
]

POOLING_METHODS = ("mean", "first", "random")


class ConversionError(ValueError):
    """A model (or part of it) cannot be converted; the message names the module."""


@dataclass
class MHAWeights:
    """The four projections of one multi-head attention, as ``(out, in)`` weights + biases."""

    num_heads: int
    head_dim: int
    q_weight: Tensor
    k_weight: Tensor
    v_weight: Tensor
    o_weight: Tensor
    q_bias: Tensor | None
    k_bias: Tensor | None
    v_bias: Tensor | None
    o_bias: Tensor | None
    attn_drop: float
    proj_drop: float


# --------------------------------------------------------------------------------------------
# Recognising attention modules


def _timm_attention_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        import timm.layers as timm_layers

        cls = getattr(timm_layers, "Attention", None)
        if isinstance(cls, type):
            classes.append(cls)
    except ImportError:
        pass
    try:
        import timm.models.vision_transformer as timm_vit

        cls = getattr(timm_vit, "Attention", None)
        if isinstance(cls, type) and cls not in classes:
            classes.append(cls)
    except ImportError:
        pass
    return tuple(classes)


def _hf_vit_module() -> Any:
    try:
        from transformers.models.vit import modeling_vit
    except ImportError:
        return None
    return modeling_vit


def _is_hf_vit_attention(module: nn.Module) -> bool:
    vit = _hf_vit_module()
    return (
        vit is not None
        and isinstance(module, vit.ViTAttention)
        and type(module).__module__ == vit.__name__
    )


def _kind(module: nn.Module) -> str | None:
    """``"timm"``/``"hf"`` for a supported MHA module, ``None`` otherwise."""
    if type(module) in _timm_attention_classes():
        return "timm"
    if _is_hf_vit_attention(module):
        return "hf"
    return None


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


def find_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(path, module)`` of every convertible self-attention, or raise.

    Raises :class:`ConversionError` naming the first module that looks like attention but is
    not a supported layout (or is a supported class configured in a way we cannot reproduce),
    and when nothing convertible is found at all.
    """
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        label = path or "<root>"
        if isinstance(module, GroupedQueryAttention):
            raise ConversionError(
                f"module {label!r} is already a GroupedQueryAttention; convert the original "
                "multi-head model instead"
            )
        kind = _kind(module)
        if kind is not None:
            read_mha_weights(module, path)  # validates the configuration, raises if unsupported
            found.append((path, module))
            inside.append(path)
        elif _looks_like_attention(module):
            raise ConversionError(
                f"cannot convert module {label!r} of type {type(module).__qualname__}: "
                "supported attention layouts are timm Attention (fused qkv, no qk-norm, "
                "scale-norm or gate) and transformers ViTAttention"
            )
    _check_timm_blocks(model, [p for p, _ in found])
    if not found:
        raise ConversionError(
            f"no convertible self-attention found in {type(model).__qualname__}; expected "
            "a timm VisionTransformer or a transformers ViTModel/ViTForImageClassification"
        )
    return found


def _check_timm_blocks(model: nn.Module, paths: list[str]) -> None:
    """Every block of a timm ViT must hold a convertible attention (no fused block kernels)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        return
    for index, block in enumerate(blocks):
        prefix = f"blocks.{index}."
        if not any(p.startswith(prefix) for p in paths):
            raise ConversionError(
                f"cannot convert block 'blocks.{index}' of type {type(block).__qualname__}: it "
                "holds no timm Attention module (its attention is fused into the block)"
            )


# --------------------------------------------------------------------------------------------
# Reading the original weights


def _identity(module: Any) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _dropout_p(module: Any) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _split_rows(weight: Tensor | None, parts: int) -> list[Tensor | None]:
    if weight is None:
        return [None] * parts
    return list(weight.chunk(parts, dim=0))


def _read_timm(module: Any, label: str) -> MHAWeights:
    allowed = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "gate"}
    extra = sorted({name for name, _ in module.named_children()} - allowed)
    if extra:
        raise ConversionError(
            f"cannot convert module {label!r}: unknown submodule {extra[0]!r} in timm Attention"
        )
    if not (_identity(getattr(module, "q_norm", None))
            and _identity(getattr(module, "k_norm", None))):
        raise ConversionError(f"cannot convert module {label!r}: qk-norm is not supported")
    if not _identity(getattr(module, "norm", None)):
        raise ConversionError(f"cannot convert module {label!r}: scale-norm is not supported")
    if getattr(module, "gate", None) is not None:
        raise ConversionError(f"cannot convert module {label!r}: gated attention is not supported")
    qkv, proj = module.qkv, module.proj
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        raise ConversionError(f"cannot convert module {label!r}: qkv and proj must be nn.Linear")
    heads, head_dim = int(module.num_heads), int(module.head_dim)
    width = heads * head_dim
    if qkv.out_features != 3 * width or proj.in_features != width:
        raise ConversionError(
            f"cannot convert module {label!r}: qkv has {qkv.out_features} outputs, expected "
            f"3 x {heads} heads x {head_dim}"
        )
    if proj.out_features != qkv.in_features:
        raise ConversionError(
            f"cannot convert module {label!r}: output width {proj.out_features} differs from "
            f"input width {qkv.in_features} (dim_out is not supported)"
        )
    qw, kw, vw = _split_rows(qkv.weight, 3)
    qb, kb, vb = _split_rows(qkv.bias, 3)
    assert qw is not None and kw is not None and vw is not None
    return MHAWeights(
        heads, head_dim, qw, kw, vw, proj.weight, qb, kb, vb, proj.bias,
        attn_drop=_dropout_p(getattr(module, "attn_drop", None)),
        proj_drop=_dropout_p(getattr(module, "proj_drop", None)),
    )


def _hf_layout(module: nn.Module) -> str:
    """``"flat"`` (q_proj...), ``"legacy-tuple"`` or ``"tensor"`` (nested layouts)."""
    if hasattr(module, "q_proj"):
        return "flat"
    params = inspect.signature(type(module).forward).parameters
    return "legacy-tuple" if "output_attentions" in params else "tensor"


def _read_hf(module: Any, label: str) -> MHAWeights:
    layout = _hf_layout(module)
    if layout == "flat":
        q, k, v, o = module.q_proj, module.k_proj, module.v_proj, module.o_proj
        heads, head_dim = int(module.num_attention_heads), int(module.head_dim)
        attn_drop, proj_drop = float(getattr(module, "attention_dropout", 0.0)), 0.0
    else:
        inner, output = module.attention, module.output
        if getattr(module, "pruned_heads", None):
            raise ConversionError(f"cannot convert module {label!r}: it has pruned heads")
        q, k, v, o = inner.query, inner.key, inner.value, output.dense
        heads, head_dim = int(inner.num_attention_heads), int(inner.attention_head_size)
        attn_drop = _dropout_p(getattr(inner, "dropout", None))
        proj_drop = _dropout_p(getattr(output, "dropout", None))
    linears: tuple[Any, ...] = (q, k, v, o)
    if not all(isinstance(m, nn.Linear) for m in linears):
        raise ConversionError(f"cannot convert module {label!r}: projections must be nn.Linear")
    width = heads * head_dim
    if any(m.out_features != width for m in (q, k, v)) or o.in_features != width:
        raise ConversionError(
            f"cannot convert module {label!r}: projections do not match {heads} heads x "
            f"{head_dim}"
        )
    if o.out_features != q.in_features:
        raise ConversionError(f"cannot convert module {label!r}: output width != input width")
    return MHAWeights(
        heads, head_dim, q.weight, k.weight, v.weight, o.weight, q.bias, k.bias, v.bias, o.bias,
        attn_drop=attn_drop, proj_drop=proj_drop,
    )


def read_mha_weights(module: nn.Module, path: str = "") -> MHAWeights:
    """Read the projections of a supported MHA module; raise naming ``path`` otherwise."""
    label = path or "<root>"
    kind = _kind(module)
    if kind == "timm":
        return _read_timm(module, label)
    if kind == "hf":
        return _read_hf(module, label)
    raise ConversionError(
        f"cannot convert module {label!r} of type {type(module).__qualname__}: not a supported "
        "attention layout"
    )


# --------------------------------------------------------------------------------------------
# Pooling and building the replacement


def pool_heads(
    weight: Tensor,
    num_heads: int,
    num_kv_heads: int,
    pooling: str = "mean",
    groups: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Pool ``num_heads`` row blocks of ``weight`` into ``num_kv_heads`` groups.

    ``weight`` is ``(num_heads * head_dim, ...)`` (a weight or a bias). Groups are the
    contiguous runs of :func:`kdgqa.even_counts`, or ``groups`` (lists of head indices, any
    order, one per KV head). ``mean`` averages each group (GQA's recipe), ``first`` keeps
    its first head, ``random`` draws fresh values with the group's standard deviation (a
    bias starts at zero) from torch's generator, the "random init" ablation of GQA.
    """
    if pooling not in POOLING_METHODS:
        raise ConversionError(
            f"unknown pooling {pooling!r}; valid pooling methods: {', '.join(POOLING_METHODS)}"
        )
    heads = weight.reshape(num_heads, -1, *weight.shape[1:])
    if groups is None:
        parts: Sequence[Tensor] = torch.split(heads, even_counts(num_heads, num_kv_heads), 0)
    else:
        parts = [heads[list(group)] for group in groups]
    pooled: list[Tensor] = []
    for group in parts:
        if pooling == "mean":
            pooled.append(group.float().mean(0).to(weight.dtype))
        elif pooling == "first":
            pooled.append(group[0].clone())
        elif weight.dim() == 1:
            pooled.append(torch.zeros_like(group[0]))
        else:
            std = group.float().std()
            pooled.append((torch.randn(group[0].shape) * std).to(weight.dtype))
    return torch.cat(pooled, dim=0).to(weight.device)


class HFViTGroupedAttention(GroupedQueryAttention):
    """:class:`GroupedQueryAttention` called like transformers' ``ViTAttention``.

    ``output_style`` is what the installed ``ViTLayer`` unpacks: ``"flat"`` returns
    ``(out, None)``; ``"legacy-tuple"`` returns ``(out,)`` or ``(out, None)`` when attentions
    are requested; ``"tensor"`` returns ``out``. Attention weights are never materialised.
    """

    def __init__(self, *args: Any, output_style: str = "flat", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if output_style not in ("flat", "legacy-tuple", "tensor"):
            raise ValueError(f"unknown output_style {output_style!r}")
        self.output_style = output_style

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.output_style == "flat":
            mask = args[0] if args else kwargs.get("attention_mask")
            out = super().forward(hidden_states, attn_mask=mask)
            return out, None
        head_mask = args[0] if args else kwargs.get("head_mask")
        if head_mask is not None:
            raise ValueError("head_mask is not supported by grouped-query attention")
        out = super().forward(hidden_states)
        if self.output_style == "tensor":
            return out
        wants = args[1] if len(args) > 1 else kwargs.get("output_attentions", False)
        return (out, None) if wants else (out,)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_style={self.output_style!r}"


def _build_replacement(
    module: nn.Module,
    weights: MHAWeights,
    scheme: str,
    num_kv_heads: int,
    pooling: str,
    scheme_options: dict[str, Any],
    groups: list[list[int]] | None = None,
) -> GroupedQueryAttention:
    heads, head_dim = weights.num_heads, weights.head_dim
    dim = weights.q_weight.shape[1]
    common: dict[str, Any] = dict(
        qkv_bias=weights.q_bias is not None,
        attn_drop=weights.attn_drop,
        proj_drop=weights.proj_drop,
        head_dim=head_dim,
        proj_bias=weights.o_bias is not None,
        **scheme_options,
    )
    new: GroupedQueryAttention
    if _kind(module) == "hf":
        new = HFViTGroupedAttention(
            dim, heads, num_kv_heads, scheme, output_style=_hf_layout(module), **common
        )
    else:
        new = GroupedQueryAttention(dim, heads, num_kv_heads, scheme, **common)
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
        qkv_weight = torch.cat(
            [queries(weights.q_weight), pool(weights.k_weight), pool(weights.v_weight)]
        )
        new.qkv.weight.copy_(qkv_weight)
        if weights.q_bias is not None:
            assert weights.k_bias is not None and weights.v_bias is not None
            new.qkv.bias.copy_(torch.cat(
                [queries(weights.q_bias), pool(weights.k_bias), pool(weights.v_bias)]
            ))
        new.proj.weight.copy_(o_weight.reshape(weights.o_weight.shape))
        if weights.o_bias is not None:
            new.proj.bias.copy_(weights.o_bias)
    if groups is not None:
        allocator: Any = new.allocator
        allocator.set_groups([len(g) for g in groups], order)
    new.train(module.training)
    return new


def _calibrated_groups(
    model: nn.Module,
    plans: list[tuple[str, nn.Module, MHAWeights]],
    scheme: str,
    num_kv_heads: int,
    calibration: Any,
    scheme_options: dict[str, Any],
    pooling: str = "mean",
) -> dict[str, Any]:
    """Check ``calibration`` against the scheme; measure and plan groups where needed."""
    from kdgqa.schemes import SCHEMES, CalibratedAllocator, build_allocator

    cls = SCHEMES.get(scheme) if isinstance(scheme, str) else None
    needs = cls is not None and cls.needs_calibration
    if isinstance(calibration, str) and calibration == "recorded":
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
    # Validate the options and G on every layer before running the model.
    allocators = []
    for path, _, weights in plans:
        try:
            allocators.append(build_allocator(scheme, weights.num_heads, num_kv_heads,
                                              **scheme_options))
        except ValueError as error:
            raise ConversionError(f"cannot convert module {path!r}: {error}") from None
    allocator = allocators[0]
    assert isinstance(allocator, CalibratedAllocator)
    from kdgqa.calibrate import plan_groups

    modules = {path: (module, weights) for path, module, weights in plans}

    def build(path: str, groups: list[list[int]]) -> nn.Module:
        module, weights = modules[path]
        return _build_replacement(module, weights, scheme, num_kv_heads, pooling,
                                  dict(scheme_options), groups)

    return plan_groups(
        model, plans, num_kv_heads, calibration,
        statistic=allocator.options["statistic"], equal=allocator.equal_groups,
        values=allocator.uses_values, max_images=allocator.options["calibration_images"],
        selection=allocator.options["selection"], build=build,
    )


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def iter_grouped(model: nn.Module) -> Iterator[tuple[str, GroupedQueryAttention]]:
    """Yield ``(path, module)`` for every :class:`GroupedQueryAttention` in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, GroupedQueryAttention):
            yield path, module


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
    groups are chosen (``kdgqa.calibrate``), query heads are permuted so groups are
    contiguous and each KV head is pooled from its own group; the plans are kept on
    ``model.kdgqa_conversion["calibration"]``. ``calibration="recorded"`` builds the
    structure only, for a state dict that holds the allocation (how checkpoints reload).
    """
    if pooling not in POOLING_METHODS:
        raise ConversionError(
            f"unknown pooling {pooling!r}; valid pooling methods: {', '.join(POOLING_METHODS)}"
        )
    if model is None or not isinstance(model, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(model).__qualname__}")
    found = find_attention(model)
    plans = [(path, module, read_mha_weights(module, path)) for path, module in found]
    heads = {w.num_heads for _, _, w in plans}
    groups = _calibrated_groups(model, plans, scheme, num_kv_heads, calibration, scheme_options,
                                pooling)
    # Build every replacement first: scheme or G errors surface before the model changes.
    replacements: list[tuple[str, GroupedQueryAttention]] = []
    for path, module, weights in plans:
        try:
            new = _build_replacement(
                module, weights, scheme, num_kv_heads, pooling, dict(scheme_options),
                groups[path].groups if groups else None,
            )
        except ConversionError:
            raise
        except ValueError as error:
            raise ConversionError(f"cannot convert module {path!r}: {error}") from None
        replacements.append((path, new))
    for path, new in replacements:
        _set_submodule(model, path, new)
    conversion: dict[str, Any] = {
        "scheme": scheme,
        "num_kv_heads": num_kv_heads,
        "num_heads": sorted(heads)[0] if len(heads) == 1 else sorted(heads),
        "pooling": pooling,
        "scheme_options": dict(replacements[0][1].scheme_options),
        "layers": [path for path, _ in replacements],
    }
    if getattr(replacements[0][1].allocator, "needs_calibration", False):
        # Reloading rebuilds the structure only; the allocation is in the state dict.
        conversion["scheme_options"]["calibration"] = "recorded"
    if groups:
        conversion["calibration"] = {
            path: {"groups": plan.groups, "loss": plan.loss,
                   "contiguous_loss": plan.contiguous_loss,
                   "candidate_errors": plan.candidate_errors}
            for path, plan in groups.items()
        }
    setattr(model, "kdgqa_conversion", conversion)  # noqa: B010 (nn.Module attribute typing)
    return model
