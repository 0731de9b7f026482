"""Write a uniformly grouped model as a native timm GQA checkpoint: fewer K/V heads on disk.

:func:`kdgqa.io.export.export_mha` repeats K/V heads so any loader takes the result, and the
KV saving is gone. timm's ``Eva`` takes ``num_kv_heads`` (with ``attn_type="rope"`` and
separate ``q_proj`` / ``k_proj`` / ``v_proj``; query head ``h`` reads KV head
``h // (H / G)``), so a conversion whose fixed map is exactly that contiguous uniform one is
written as an ``Eva`` checkpoint that stock timm loads and runs with the smaller K/V:

* **Eva sources** keep their own architecture, with ``attn_type="rope"``,
  ``qkv_fused=False`` and ``num_kv_heads``. ``AttentionRope`` computes what ``EvaAttention``
  computes (its K bias takes the converted K bias, zero unless trained).
* **Plain ViT sources** (timm ``VisionTransformer``) become an ``Eva`` with rope off, the
  ViT's absolute position embedding, class/register tokens, norms, GELU ``Mlp`` and layer
  scale: the same blocks term for term (a ViT without biases gets zero biases). What ``Eva``
  cannot express (another activation, norm or MLP, a patch-embedding norm, a distillation
  token, attention pooling) is refused with the reason.

Uneven, permuted-then-uneven and per-input maps are refused (use ``export_mha``). Before
anything is written the native model is loaded with the converted weights and run on one
seeded random batch; if it does not give the converted model's logits the export is refused.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ExportError, OutputError
from kdgqa.io.base import base_spec
from kdgqa.io.export import fixed_kv_index
from kdgqa.io.weights import safetensors_failure
from kdgqa.models.locate import grouped_layers
from kdgqa.models.registry import family_of
from kdgqa.models.timm_eva import EVA_STAND_IN, TimmEva, eva_full_kwargs
from kdgqa.models.timm_vit import TimmViT

__all__ = ["export_native", "native_gqa_available", "uniform_kv_heads"]

#: Relative logit difference (fp32) above which the native model is not the converted one.
#: Both run the same arithmetic in a different order (fused vs separate projections).
CHECK_TOLERANCE = 1e-4


def native_gqa_available() -> bool:
    """Whether the installed timm's ``Eva`` takes ``num_kv_heads``."""
    from timm.models.eva import Eva

    return "num_kv_heads" in inspect.signature(Eva.__init__).parameters


def uniform_kv_heads(module: GroupedQueryAttention, path: str = "") -> int:
    """``module``'s KV heads when its evaluation map is the contiguous uniform one that
    native GQA assumes; :class:`ExportError` with the reason otherwise."""
    index = fixed_kv_index(module, path)
    heads, kv_heads = module.num_heads, module.num_kv_heads
    if heads % kv_heads or not torch.equal(index, torch.arange(heads) // (heads // kv_heads)):
        raise ExportError(
            f"cannot export {path or '<root>'!r} as native GQA: query head h must read KV head "
            f"h // {heads // kv_heads if heads % kv_heads == 0 else 'H/G'}, but its map is "
            f"{index.tolist()} (uneven or reordered groups); use export_mha")
    return kv_heads


def _vit_as_eva(vit: Any) -> dict[str, Any]:
    """Eva constructor arguments computing exactly what timm ViT ``vit`` computes."""
    from timm.layers import LayerNorm, LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block

    def refuse(why: str) -> ExportError:
        return ExportError(f"cannot export this {type(vit).__name__} as native GQA: {why}; "
                           "use export_mha")

    if type(vit).__name__ != "VisionTransformer":
        raise refuse("only a plain VisionTransformer maps onto Eva (a subclass may add "
                     "tokens or change the forward)")
    if not isinstance(vit.patch_embed, PatchEmbed) or not isinstance(
            vit.patch_embed.norm, nn.Identity):
        raise refuse("its patch embedding is not a plain timm PatchEmbed")
    norms = [vit.norm_pre, vit.norm, vit.fc_norm]
    for block in vit.blocks:
        if type(block) is not Block:
            raise refuse(f"block type {type(block).__name__} is not timm's Block")
        if not isinstance(block.mlp, Mlp) or type(block.mlp.act) is not nn.GELU or (
                block.mlp.act.approximate != "none"):
            raise refuse("Eva's MLP is timm's Mlp with exact GELU")
        if not isinstance(block.mlp.norm, nn.Identity):
            norms.append(block.mlp.norm)
        for ls in (block.ls1, block.ls2):
            if not isinstance(ls, LayerScale | nn.Identity):
                raise refuse("layer scale other than timm's LayerScale")
        if isinstance(block.ls1, nn.Identity) != isinstance(block.ls2, nn.Identity):
            raise refuse("layer scale on one branch only")
        norms += [block.norm1, block.norm2]
        # qk-norm: timm's per-head norms over head_dim, the layout Eva's qk_norm builds too
        # (a converted layer holds None where the original had nn.Identity).
        norms += [n for n in (block.attn.q_norm, block.attn.k_norm) if n is not None]
    for norm in norms:
        if not isinstance(norm, nn.Identity) and not (
                isinstance(norm, LayerNorm) and norm.eps == 1e-6 and norm.weight is not None
                and norm.bias is not None):
            raise refuse("Eva's norms are timm LayerNorm with eps 1e-6, weight and bias")
    if vit.attn_pool is not None:
        raise refuse(f"attention pooling {type(vit.attn_pool).__name__}")
    block = vit.blocks[0]
    pe = vit.patch_embed
    return {
        "img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
        "in_chans": int(pe.proj.in_channels), "num_classes": int(vit.num_classes),
        "global_pool": vit.global_pool, "embed_dim": int(vit.embed_dim), "depth": len(vit.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "qk_norm": not isinstance(block.attn.k_norm, nn.Identity | None),
        "init_values": None if isinstance(block.ls1, nn.Identity) else 1.0,
        "scale_mlp": not isinstance(block.mlp.norm, nn.Identity),
        "class_token": vit.cls_token is not None,
        "num_reg_tokens": int(getattr(vit, "num_reg_tokens", 0)),
        "no_embed_class": bool(vit.no_embed_class),
        "use_abs_pos_emb": vit.pos_embed is not None, "use_rot_pos_emb": False,
        "use_pre_transformer_norm": not isinstance(vit.norm_pre, nn.Identity),
        "use_post_transformer_norm": not isinstance(vit.norm, nn.Identity),
        "use_fc_norm": not isinstance(vit.fc_norm, nn.Identity),
        "dynamic_img_size": bool(vit.dynamic_img_size),
        "dynamic_img_pad": bool(getattr(pe, "dynamic_img_pad", False)),
    }


def _vit_key(key: str) -> str:
    """A ViT state-dict key as Eva spells it (layer scale is ``gamma_1``/``gamma_2``)."""
    return key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")


def _native_plan(model: nn.Module) -> tuple[str, dict[str, Any], bool]:
    """Architecture name, MHA constructor arguments and whether keys are a ViT's."""
    family = family_of(model)
    if isinstance(family, TimmEva):
        spec = base_spec(model)
        if spec.get("name"):
            return str(spec["name"]), dict(spec.get("kwargs") or {}), False
        return EVA_STAND_IN, eva_full_kwargs(dict(spec.get("kwargs") or {})), False
    if type(family) is TimmViT:  # not its subclasses (BEiT, Swin have no native layout)
        return EVA_STAND_IN, eva_full_kwargs(_vit_as_eva(model)), True
    raise ExportError(f"cannot export a {type(model).__name__} as native GQA: only timm Eva "
                      "and timm VisionTransformer sources are supported; use export_mha")


def _attention_state(module: GroupedQueryAttention, prefix: str) -> dict[str, Tensor]:
    """``module``'s tensors under the names timm's ``AttentionRope`` gives them."""
    heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim
    sizes = [heads * dim, kv_heads * dim, kv_heads * dim]
    out: dict[str, Tensor] = {}
    for name, weight in zip(("q_proj", "k_proj", "v_proj"),
                            module.qkv.weight.detach().split(sizes), strict=True):
        out[f"{prefix}{name}.weight"] = weight
    if module.qkv.bias is not None:
        for name, bias in zip(("q_proj", "k_proj", "v_proj"),
                              module.qkv.bias.detach().split(sizes), strict=True):
            out[f"{prefix}{name}.bias"] = bias
    out[f"{prefix}proj.weight"] = module.proj.weight.detach()
    out[f"{prefix}proj.bias"] = (module.proj.bias.detach() if module.proj.bias is not None
                                 else module.proj.weight.new_zeros(module.proj.out_features))
    for ours, theirs in (("q_norm", "q_norm"), ("k_norm", "k_norm"), ("out_norm", "norm")):
        norm = getattr(module, ours, None)
        if norm is not None:
            out.update({f"{prefix}{theirs}.{k}": v for k, v in norm.state_dict().items()})
    return out


def _check_same(model: nn.Module, native: nn.Module) -> None:
    """Refuse unless ``native`` gives ``model``'s logits on one seeded random batch."""
    family = family_of(model)
    assert family is not None
    geometry = family.input_geometry(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, geometry.channels, geometry.image_size, geometry.image_size,
                    generator=generator)
    ref = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = x.to(ref.device, ref.dtype)
            want, got = model(x).float(), native.to(ref.device)(x).float()
    finally:
        model.train(was_training)
    tolerance = CHECK_TOLERANCE if ref.dtype == torch.float32 else 3e-2
    error = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    if not error <= tolerance:
        raise ExportError(f"cannot export as native GQA: the rebuilt timm model's logits "
                          f"differ from the converted model's by {error:.2e} (relative); "
                          "use export_mha")


def export_native(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (converted, contiguous uniform groups) as a native timm GQA checkpoint.

    ``directory`` gets ``model.safetensors`` (K/V projections of ``G`` heads) and a timm
    ``config.json``; ``timm.create_model("local-dir:DIR", pretrained=True)`` loads it
    without kdgqa. Raises :class:`ExportError` with the reason where that is impossible.
    """
    import timm

    if not native_gqa_available():
        raise ExportError(f"cannot export as native GQA: timm {timm.__version__}'s Eva takes "
                          "no num_kv_heads (a newer timm does); use export_mha")
    grouped = list(grouped_layers(model))
    if not grouped:
        raise ExportError("model has no GroupedQueryAttention to export; save it directly")
    kv_heads = {path: uniform_kv_heads(module, path) for path, module in grouped}
    name, kwargs, from_vit = _native_plan(model)
    blocks = getattr(model, "blocks", None)
    paths = [f"blocks.{i}.attn" for i in range(len(blocks))] if blocks is not None else []
    if sorted(paths) != sorted(kv_heads):
        raise ExportError(f"cannot export as native GQA: expected grouped attention at "
                          f"{paths[:2]}..., found {list(kv_heads)[:2]}...")
    per_block = [kv_heads[p] for p in paths]
    if kwargs.get("use_post_norm"):
        raise ExportError("cannot export as native GQA: timm's post-norm Eva block takes no "
                          "num_kv_heads; use export_mha")
    native_args = {**kwargs, "attn_type": "rope", "qkv_fused": False,
                   "num_kv_heads": per_block[0] if len(set(per_block)) == 1 else per_block}
    native: Any
    try:
        native = timm.create_model(name, pretrained=False, **native_args)
    except Exception as error:  # the constructor's own assertion names the problem
        raise ExportError(f"cannot export as native GQA: timm.create_model({name!r}) refuses "
                          f"the grouped arguments: {error}") from None

    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(p + ".") for p in paths):
            state[_vit_key(key) if from_vit else key] = value.detach()
    for path, module in grouped:
        state.update(_attention_state(module, path + "."))
    if from_vit:  # a ViT built with proj_bias=False has no MLP biases: Eva's are then zero
        for key, value in native.state_dict().items():
            if key.endswith(".bias") and key not in state and key[:-5] + ".weight" in state:
                state[key] = torch.zeros_like(value)
    try:
        native.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = str(error).strip().splitlines()
        raise ExportError("cannot export as native GQA: the converted tensors do not fit the "
                          f"rebuilt timm model: {' '.join(detail[:2])}") from None
    dtype = grouped[0][1].qkv.weight.dtype
    native.to(dtype).eval()
    _check_same(model, native)

    size = list(native.patch_embed.img_size)
    config = {
        "architecture": name,
        "num_classes": int(native.num_classes),
        "num_features": int(native.num_features),
        "model_args": native_args,
        "pretrained_cfg": {
            "input_size": [int(native.patch_embed.proj.in_channels), *size],
            "num_classes": int(native.num_classes),
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in native.state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    except (OSError, SafetensorError) as error:  # the writers on a full disk
        raise OutputError(directory, safetensors_failure(error)) from None
    return directory
