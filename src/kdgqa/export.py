"""Write a grouped-query model with a fixed allocation back as a plain MHA checkpoint.

Each query head gets its own copy of the K/V head it reads, so the exported model computes
exactly what the grouped one computes at evaluation time, and loads with timm or
transformers alone -- no kdgqa needed. Key-driven allocations (``kdgqa``, reference DGQA)
and evaluation-time noise (reference PGQA) have no fixed equivalent and are refused; sound
DGQA exports its frozen, learnt allocation.

Output: timm models get ``model.safetensors`` + a timm ``config.json`` (``architecture``,
``model_args``), loadable with ``timm.create_model("local-dir:DIR", pretrained=True)`` or
``timm.create_model(architecture, checkpoint_path=DIR/model.safetensors, **model_args)``;
Hugging Face models get the model's own ``save_pretrained`` output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.convert import iter_grouped
from kdgqa.schemes import (
    DGQAAllocator,
    KDGQAAllocator,
    PerSampleKDGQAAllocator,
    PGQAAllocator,
)
from kdgqa.sources import base_spec, build_base

__all__ = ["ExportError", "export_mha", "fixed_kv_index"]

# Registered timm names whose own defaults equal the class defaults, so that
# ``create_model(name, **full_kwargs)`` builds exactly ``cls(**full_kwargs)``.
_TIMM_STAND_INS = {
    "VisionTransformer": "vit_base_patch16_224",
    "VisionTransformerDistilled": "deit_base_distilled_patch16_224",
}


class ExportError(ValueError):
    """The model has no fixed MHA equivalent or its base cannot be rebuilt."""


def fixed_kv_index(module: GroupedQueryAttention, path: str = "") -> Tensor:
    """The query-head -> KV-head map ``module`` uses at evaluation time, if it is fixed."""
    allocator: Any = module.allocator
    reference = bool(allocator.options.get("reference", False))
    label = path or "<root>"
    if isinstance(allocator, (KDGQAAllocator, PerSampleKDGQAAllocator)):
        raise ExportError(
            f"cannot export {label!r}: scheme {allocator.name!r} chooses its allocation from "
            "the keys on every input, so no fixed MHA checkpoint is equivalent"
        )
    if isinstance(allocator, DGQAAllocator):
        if reference:
            raise ExportError(
                f"cannot export {label!r}: reference DGQA changes its allocation on every "
                "evaluation batch"
            )
        from kdgqa.allocation import counts_to_kv_index

        index: Tensor = counts_to_kv_index(cast(Tensor, allocator.counts), module.num_heads)
        return index.cpu()
    if isinstance(allocator, PGQAAllocator) and reference:
        raise ExportError(
            f"cannot export {label!r}: reference PGQA adds noise at evaluation time"
        )
    static: Tensor = allocator.static_kv_index
    return static.cpu()


def _expanded(module: GroupedQueryAttention, kv_index: Tensor) -> dict[str, Tensor | None]:
    """Per-head Q, K, V (K/V repeated along ``kv_index``) and output weights of ``module``."""
    heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim
    weight = module.qkv.weight.detach()
    bias = module.qkv.bias.detach() if module.qkv.bias is not None else None

    def parts(t: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if t is None:
            return None, None, None
        q, k, v = t.split([heads * dim, kv_heads * dim, kv_heads * dim])

        def rep(x: Tensor) -> Tensor:
            rows = x.reshape(kv_heads, dim, *x.shape[1:])[kv_index]
            return rows.reshape(heads * dim, *x.shape[1:])

        return q, rep(k), rep(v)

    qw, kw, vw = parts(weight)
    qb, kb, vb = parts(bias)
    return {
        "qw": qw, "kw": kw, "vw": vw, "qb": qb, "kb": kb, "vb": vb,
        "ow": module.proj.weight.detach(),
        "ob": module.proj.bias.detach() if module.proj.bias is not None else None,
    }


def _write(linear: Any, weight: Tensor | None, bias: Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(bias)


def _write_attention(target: Any, w: dict[str, Tensor | None]) -> None:
    if hasattr(target, "qkv"):  # timm Attention
        with torch.no_grad():
            target.qkv.weight.copy_(torch.cat([w["qw"], w["kw"], w["vw"]]))  # type: ignore[list-item]
            if target.qkv.bias is not None:
                target.qkv.bias.copy_(torch.cat([w["qb"], w["kb"], w["vb"]]))  # type: ignore[list-item]
        _write(target.proj, w["ow"], w["ob"])
    elif hasattr(target, "q_proj"):  # transformers ViTAttention, flat layout
        _write(target.q_proj, w["qw"], w["qb"])
        _write(target.k_proj, w["kw"], w["kb"])
        _write(target.v_proj, w["vw"], w["vb"])
        _write(target.o_proj, w["ow"], w["ob"])
    else:  # transformers ViTAttention, nested layout
        _write(target.attention.query, w["qw"], w["qb"])
        _write(target.attention.key, w["kw"], w["kb"])
        _write(target.attention.value, w["vw"], w["vb"])
        _write(target.output.dense, w["ow"], w["ob"])


def _timm_config(spec: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    import timm

    name = spec.get("name") or _TIMM_STAND_INS.get(spec.get("class") or "")
    kwargs = dict(spec.get("kwargs") or {})
    if name is None:
        raise ExportError(f"cannot name a timm architecture for {spec}")
    with torch.device("meta"):
        check = timm.create_model(name, pretrained=False, **kwargs)
    if repr(check) != repr(model):
        raise ExportError(
            f"timm.create_model({name!r}, **{kwargs}) does not rebuild this model; "
            "export needs a model built from a timm name or kdgqa.create_timm_vit"
        )
    any_model: Any = model
    size = kwargs.get("img_size") or list(any_model.patch_embed.img_size)
    size = [size, size] if isinstance(size, int) else list(size)
    return {
        "architecture": name,
        "num_classes": int(any_model.num_classes),
        "num_features": int(any_model.num_features),
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [int(any_model.patch_embed.proj.in_channels), *size],
            "num_classes": int(any_model.num_classes),
        },
    }


def export_mha(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (converted, fixed allocation) as a plain timm/HF MHA checkpoint.

    Every non-attention tensor is copied unchanged; attention K/V heads are repeated so each
    query head has the one it reads. Returns ``directory``.
    """
    grouped = list(iter_grouped(model))
    if not grouped:
        raise ExportError("model has no GroupedQueryAttention to export; save it directly")
    plans = [(path, module, fixed_kv_index(module, path)) for path, module in grouped]
    spec = base_spec(model)
    base = build_base(spec)
    base_state = base.state_dict()
    attention_paths = [path for path, _, _ in plans]
    copied = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(p + ".") for p in attention_paths)
    }
    for key, value in copied.items():
        if key not in base_state or base_state[key].shape != value.shape:
            raise ExportError(f"tensor {key!r} has no counterpart in the rebuilt base model")
    base.load_state_dict(copied, strict=False)
    for path, module, kv_index in plans:
        _write_attention(base.get_submodule(path), _expanded(module, kv_index))
    dtype = next(iter(module.qkv.parameters())).dtype
    base.to(dtype)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if spec["library"] == "timm":
        from safetensors.torch import save_file

        config = _timm_config(spec, base)
        state = {k: v.detach().cpu().contiguous() for k, v in base.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        any_base: Any = base
        any_base.save_pretrained(str(directory))
    return directory
