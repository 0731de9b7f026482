"""timm's ``VisionTransformer`` family: ViT, DeiT (distilled, DeiT III), DINOv2-style (layer
scale, registers), CLIP and SigLIP image towers, qk-norm ViTs.

Attention is timm's ``Attention`` (fused ``qkv`` Linear, optional qkv/proj bias, any head
dim), found in ``timm.layers`` (1.0.2x+) or ``timm.models.vision_transformer`` (early
1.0.x). qk-norm is kept (see :func:`shared_head_norm`); scale-norm, a gate, a different
output width and blocks with fused attention (``ParallelScalingBlock``) are refused. The
latent-query pooling head of ``global_pool='map'`` (``AttentionPoolLatent``) is left
multi-head: it is a cross-attention from one learned query, whose keys and values are
computed once per image and never cached, so grouping them saves no cache memory and would
only change the function.
A model is recorded by its timm name (``timm.create_model``) or its class and constructor
arguments, read back from its modules and checked by rebuilding the structure.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ConversionError, ExportError, SourceError
from kdgqa.models.base import Features, InputGeometry, MHAWeights, ModelFamily

__all__ = ["TIMM_VIT_CLASSES", "TimmViT", "create_timm_vit", "jsonable", "timm_spec"]

TIMM_VIT_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")
# Registered timm names whose own defaults equal the class defaults, so that
# ``create_model(name, **full_kwargs)`` builds exactly ``cls(**full_kwargs)``.
_STAND_INS = {
    "VisionTransformer": "vit_base_patch16_224",
    "VisionTransformerDistilled": "deit_base_distilled_patch16_224",
}


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists); ``SourceError`` if it cannot be."""
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SourceError(f"model argument {value!r} is not JSON-serialisable")


def timm_spec(name: str | None, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a timm model built by name (or, without one, as a plain
    ``VisionTransformer``) with constructor arguments ``kwargs``."""
    return {"library": "timm", "name": name, "class": None if name else "VisionTransformer",
            "kwargs": jsonable(dict(kwargs or {}))}


def _attention_classes() -> tuple[type, ...]:
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


def _pool_classes() -> tuple[type, ...]:
    try:
        from timm.layers import AttentionPoolLatent
    except ImportError:
        return ()
    return (AttentionPoolLatent,)


def shared_head_norm(norm: nn.Module, head_dim: int) -> bool:
    """Whether ``norm`` normalises over ``head_dim`` only (weights shared by all heads)."""
    shape = getattr(norm, "normalized_shape", None)
    if shape is None:
        return False
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return shape == (head_dim,)


def fused_qkv_parts(attn: Any) -> tuple[Tensor, Tensor, Tensor,
                                        Tensor | None, Tensor | None, Tensor | None]:
    """Q, K, V weights and biases of a timm attention with a fused ``qkv``: its bias, or
    BEiT/Eva's separate ``q_bias``/``v_bias`` with a zero K bias (the counterpart of
    :meth:`TimmViT.write_attention`)."""
    qkv = attn.qkv
    qw, kw, vw = qkv.weight.chunk(3, dim=0)
    if qkv.bias is not None:
        qb, kb, vb = qkv.bias.chunk(3, dim=0)
        return qw, kw, vw, qb, kb, vb
    if getattr(attn, "q_bias", None) is not None:
        k_bias = getattr(attn, "k_bias", None)
        return (qw, kw, vw, attn.q_bias,
                torch.zeros_like(attn.q_bias) if k_bias is None else k_bias, attn.v_bias)
    return qw, kw, vw, None, None, None


def _has_qk_norm(attn: Any) -> bool:
    return not (is_identity(getattr(attn, "q_norm", None))
                and is_identity(getattr(attn, "k_norm", None)))


def _model_class(name: str) -> type[nn.Module]:
    from timm.models import deit, vision_transformer

    classes = {
        "VisionTransformer": vision_transformer.VisionTransformer,
        "VisionTransformerDistilled": deit.VisionTransformerDistilled,
    }
    if name not in classes:
        raise SourceError(f"unknown timm class {name!r}; expected one of {', '.join(classes)}")
    return classes[name]


def is_identity(module: Any) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _fixed_zero(bias: Tensor | None) -> None:
    """Layouts without a K bias parameter (BEiT, Eva): exporting a K bias that is not zero
    would change the function."""
    if bias is not None and bool(bias.detach().abs().max() > 0):
        raise ExportError("cannot export: this timm attention has no K bias, but the "
                          "converted model's K bias is not zero (it was trained)")


def _dropout_p(module: Any) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _constructor_arguments(model: Any) -> dict[str, Any]:
    """Constructor arguments of a timm ViT read back from its modules."""
    pe = model.patch_embed
    block = model.blocks[0]
    embed_dim = int(model.embed_dim)
    attn = block.attn
    ls = getattr(block, "ls1", None)
    kwargs: dict[str, Any] = {
        "img_size": list(pe.img_size) if pe.img_size is not None else None,
        "patch_size": list(pe.patch_size),
        "in_chans": int(pe.proj.in_channels),
        "num_classes": int(model.num_classes),
        "global_pool": model.global_pool,
        "embed_dim": embed_dim,
        "depth": len(model.blocks),
        "num_heads": int(attn.num_heads),
        "mlp_ratio": block.mlp.fc1.out_features / embed_dim,
        "qkv_bias": attn.qkv.bias is not None,
        "proj_bias": attn.proj.bias is not None,
        "class_token": model.cls_token is not None,
        "reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "pre_norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }
    if _has_qk_norm(attn):
        kwargs["qk_norm"] = True
    if type(getattr(block.mlp, "act", None)).__name__ == "QuickGELU":
        kwargs["act_layer"] = "quick_gelu"
    if ls is not None and not isinstance(ls, nn.Identity):
        kwargs["init_values"] = 1e-5
    if getattr(model, "pos_embed", None) is None:
        kwargs["pos_embed"] = "none"
    return kwargs


class TimmViT(ModelFamily):
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled`` with ``Attention``."""

    name = "timm ViT"
    library = "timm"
    supported = "timm Attention (fused qkv; qk-norm over head_dim; no scale-norm or gate)"

    def owns(self, model: nn.Module) -> bool:
        # NaFlexVit (flexible-resolution ViT) runs the same Block/Attention; it is recorded
        # by its timm name only (create_timm_vit(name) or timm:NAME).
        return (type(model).__name__ in (*TIMM_VIT_CLASSES, "NaFlexVit")
                and hasattr(model, "blocks"))

    def is_attention(self, module: nn.Module) -> bool:
        return type(module) in _attention_classes()

    def keeps(self, module: nn.Module) -> bool:
        """timm's ``AttentionPoolLatent`` (``global_pool='map'``) stays multi-head: see the
        module docstring."""
        return isinstance(module, _pool_classes())

    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        attn: Any = module
        allowed = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "gate"}
        extra = sorted({name for name, _ in attn.named_children()} - allowed)
        if extra:
            raise ConversionError(f"cannot convert module {label!r}: unknown submodule "
                                  f"{extra[0]!r} in timm Attention")
        head_dim = int(attn.head_dim)
        if _has_qk_norm(attn) and not all(
                shared_head_norm(getattr(attn, n), head_dim) for n in ("q_norm", "k_norm")):
            raise ConversionError(
                f"cannot convert module {label!r}: its qk-norm does not normalise over "
                f"head_dim={head_dim} with weights shared by all heads, so a pooled key has "
                "no norm to use")
        if not is_identity(getattr(attn, "norm", None)):
            raise ConversionError(f"cannot convert module {label!r}: scale-norm is not "
                                  "supported")
        if getattr(attn, "gate", None) is not None:
            raise ConversionError(f"cannot convert module {label!r}: gated attention is not "
                                  "supported")
        qkv, proj = attn.qkv, attn.proj
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
            raise ConversionError(f"cannot convert module {label!r}: qkv and proj must be "
                                  "nn.Linear")
        heads, head_dim = int(attn.num_heads), int(attn.head_dim)
        width = heads * head_dim
        if qkv.out_features != 3 * width or proj.in_features != width:
            raise ConversionError(
                f"cannot convert module {label!r}: qkv has {qkv.out_features} outputs, "
                f"expected 3 x {heads} heads x {head_dim}"
            )
        if proj.out_features != qkv.in_features:
            raise ConversionError(
                f"cannot convert module {label!r}: output width {proj.out_features} differs "
                f"from input width {qkv.in_features} (dim_out is not supported)"
            )
        qw, kw, vw = qkv.weight.chunk(3, dim=0)
        qb, kb, vb = qkv.bias.chunk(3, dim=0) if qkv.bias is not None else (None,) * 3
        return MHAWeights(
            heads, head_dim, qw, kw, vw, proj.weight, qb, kb, vb, proj.bias,
            attn_drop=_dropout_p(getattr(attn, "attn_drop", None)),
            proj_drop=_dropout_p(getattr(attn, "proj_drop", None)),
            key_norm=_has_qk_norm(attn),
        )

    def check_model(self, model: nn.Module, attention_paths: list[str]) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList):
            return
        for index, block in enumerate(blocks):
            prefix = f"blocks.{index}."
            if not any(p.startswith(prefix) for p in attention_paths):
                raise ConversionError(
                    f"cannot convert block 'blocks.{index}' of type "
                    f"{type(block).__qualname__}: it holds no timm Attention module (its "
                    "attention is fused into the block)"
                )

    def grouped_attention(self, module: nn.Module, weights: MHAWeights, num_kv_heads: int,
                          scheme: str, options: dict[str, Any]) -> GroupedQueryAttention:
        if _has_qk_norm(module):
            # timm's q/k norms act over head_dim with weights every head shares, so a KV head
            # pooled from a group is normalised by the very norm each of its heads used.
            attn: Any = module
            return GroupedQueryAttention(weights.width, weights.num_heads, num_kv_heads, scheme,
                                         q_norm=copy.deepcopy(attn.q_norm),
                                         k_norm=copy.deepcopy(attn.k_norm), **options)
        return GroupedQueryAttention(weights.width, weights.num_heads, num_kv_heads, scheme,
                                     **options)

    def write_attention(self, module: nn.Module, weights: MHAWeights) -> None:
        """Every timm attention layout: fused ``qkv`` (with its bias, or BEiT/Eva's separate
        ``q_bias``/``v_bias`` and no K bias), or separate ``q_proj``/``k_proj``/``v_proj``."""
        attn: Any = module
        with torch.no_grad():
            if getattr(attn, "qkv", None) is not None:
                attn.qkv.weight.copy_(torch.cat([weights.q_weight, weights.k_weight,
                                                 weights.v_weight]))
                if attn.qkv.bias is not None:
                    assert weights.q_bias is not None and weights.k_bias is not None
                    assert weights.v_bias is not None
                    attn.qkv.bias.copy_(torch.cat([weights.q_bias, weights.k_bias,
                                                   weights.v_bias]))
                elif getattr(attn, "q_bias", None) is not None:
                    _fixed_zero(weights.k_bias)
                    attn.q_bias.copy_(weights.q_bias)
                    attn.v_bias.copy_(weights.v_bias)
            else:
                for proj, w, b in ((attn.q_proj, weights.q_weight, weights.q_bias),
                                   (attn.k_proj, weights.k_weight, weights.k_bias),
                                   (attn.v_proj, weights.v_weight, weights.v_bias)):
                    proj.weight.copy_(w)
                    if proj.bias is not None:
                        proj.bias.copy_(b)
                    else:
                        _fixed_zero(b)
            attn.proj.weight.copy_(weights.o_weight)
            if attn.proj.bias is not None:
                attn.proj.bias.copy_(weights.o_bias)

    def write_extras(self, module: nn.Module, grouped: GroupedQueryAttention) -> None:
        """The trained q/k norms (and Eva's output norm) back into timm's attention."""
        for ours, theirs in (("q_norm", "q_norm"), ("k_norm", "k_norm"), ("out_norm", "norm")):
            source, target = getattr(grouped, ours, None), getattr(module, theirs, None)
            if (source is None) != is_identity(target):
                raise ExportError(f"cannot export: the converted attention has "
                                  f"{'no ' if source is None else ''}{ours} but the rebuilt "
                                  f"timm attention has {'one' if source is None else 'none'}")
            if source is not None and target is not None:
                target.load_state_dict(source.state_dict())

    def features(self, model: nn.Module, x: Tensor) -> Features:
        vit: Any = model
        hidden = vit.forward_features(x)
        return Features(vit.forward_head(hidden, pre_logits=True), vit.forward_head(hidden))

    def num_classes(self, model: nn.Module) -> int | None:
        classes = getattr(model, "num_classes", None)
        return int(classes) if classes else None

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        vit: Any = model
        vit.reset_classifier(num_classes)

    def input_geometry(self, model: nn.Module) -> InputGeometry:
        vit: Any = model
        patch_embed = getattr(vit, "patch_embed", None)
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        if patch_embed is None and cfg.get("input_size"):  # NaFlexVit: no fixed patch grid
            channels, size = int(cfg["input_size"][0]), int(cfg["input_size"][-1])
            return InputGeometry(channels, size, list(cfg.get("mean") or [0.5]),
                                 list(cfg.get("std") or [0.5]))
        if patch_embed is None or getattr(patch_embed, "img_size", None) is None:
            raise SourceError(f"cannot tell the input size of this {type(model).__name__} "
                              "(its patch_embed has no img_size)")
        size = patch_embed.img_size
        size = int(size[0] if isinstance(size, list | tuple) else size)
        return InputGeometry(int(patch_embed.proj.in_channels), size,
                             list(cfg.get("mean") or [0.5]), list(cfg.get("std") or [0.5]))

    def base_spec(self, model: nn.Module) -> dict[str, Any] | None:
        cls_name = type(model).__name__
        if cls_name not in TIMM_VIT_CLASSES:
            return None
        return {"library": "timm", "name": None, "class": cls_name,
                "kwargs": _constructor_arguments(model)}

    def unnamed_class(self, spec: dict[str, Any]) -> type[nn.Module]:
        """The class that builds a record without a timm name (subclass families: theirs)."""
        return _model_class(spec.get("class") or "VisionTransformer")

    def build_base(self, spec: dict[str, Any]) -> nn.Module:
        import timm

        kwargs = spec.get("kwargs") or {}
        name = spec.get("name")
        if not isinstance(kwargs, dict) or not (name is None or isinstance(name, str)):
            raise SourceError(f"malformed timm model description: name {name!r} must be a "
                              f"string and kwargs {kwargs!r} a mapping")
        try:
            if name:
                return timm.create_model(name, pretrained=False, **kwargs)
            return self.unnamed_class(spec)(**kwargs)
        except SourceError:
            raise
        except Exception as error:  # any constructor failure on bad arguments
            if name and not timm.is_model(name):
                raise SourceError(f"unknown timm model {name!r}: {error}") from None
            detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise SourceError(f"cannot build timm model {name or spec.get('class')!r} "
                              f"with {kwargs}: {detail or type(error).__name__}") from None

    def save_plain(self, model: nn.Module, spec: dict[str, Any], directory: Path) -> None:
        from safetensors.torch import save_file

        config = self._export_config(spec, model)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _export_config(self, spec: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """A timm ``config.json`` (architecture, model_args) that rebuilds ``model``."""
        import timm

        name = spec.get("name") or _STAND_INS.get(spec.get("class") or "")
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
        vit: Any = model
        size = kwargs.get("img_size")
        if not size:  # NaFlexVit has no fixed patch grid: its configured input size
            patch_embed = getattr(vit, "patch_embed", None)
            size = (list(patch_embed.img_size) if patch_embed is not None else
                    list((getattr(vit, "pretrained_cfg", None) or {}).get("input_size",
                                                                         [3, 224, 224])[1:]))
        size = [size, size] if isinstance(size, int) else list(size)
        return {
            "architecture": name,
            "num_classes": int(vit.num_classes),
            "num_features": int(vit.num_features),
            "model_args": kwargs,
            "pretrained_cfg": {
                "input_size": [self.input_geometry(model).channels, *size],
                "num_classes": int(vit.num_classes),
            },
        }

    # ---------------------------------------------------------------- timm's own sources
    def load_pretrained(self, name: str) -> nn.Module:
        """``timm.create_model(name, pretrained=True)`` (downloads when online)."""
        import timm

        if not timm.is_model(name):
            raise SourceError(f"unknown timm model {name!r}; see timm.list_models()")
        overlay: dict[str, Any] = {}
        host = _hub_host()
        if not _reachable(host):
            # Offline: the hub client would retry for about a minute before failing.
            cached = _cached_weights(name)
            if cached is None:
                raise SourceError(
                    f"cannot load pretrained timm model {name!r}: its weights are not in the "
                    f"local Hugging Face cache and {host} cannot be reached; download them "
                    "once online, or pass a checkpoint file")
            overlay = {"pretrained_cfg_overlay": {"file": cached}}
        try:
            model = timm.create_model(name, pretrained=True, **overlay)
        except Exception as error:  # download or hub failures of any kind
            raise SourceError(f"cannot load pretrained timm model {name!r}: {error}") from None
        setattr(model, "kdgqa_base", timm_spec(name))  # noqa: B010 (nn.Module attribute typing)
        return model.eval()

    def spec_from_config(self, path: Path, config: dict[str, Any]) -> dict[str, Any]:
        """The record of the model a timm ``config.json`` (architecture, model_args) names."""
        if "architecture" not in config:
            raise SourceError(f"{str(path)!r} is not a timm config (no 'architecture')")
        if not isinstance(config["architecture"], str) or not isinstance(
            config.get("model_args") or {}, dict
        ):
            raise SourceError(f"{str(path)!r} is malformed: 'architecture' must be a string "
                              "and 'model_args' a mapping")
        kwargs = dict(config.get("model_args") or {})
        if "num_classes" in config:
            kwargs.setdefault("num_classes", config["num_classes"])
        return {"library": "timm", "name": config["architecture"], "class": None,
                "kwargs": kwargs}


#: Seconds to wait for the model hub before treating the machine as offline.
HUB_TIMEOUT = 3.0


def _hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return ""
    return urlparse(constants.ENDPOINT).hostname or ""


def _reachable(host: str) -> bool:
    """Whether a TCP connection to ``host``:443 opens within :data:`HUB_TIMEOUT`."""
    import socket

    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT).close()
    except OSError:
        return False
    return True


def _cached_weights(name: str) -> str | None:
    """The path of ``name``'s pretrained weights in the local Hugging Face cache, if there."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for file in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, file)
        if isinstance(path, str):
            return path
    return None


def create_timm_vit(name: str | None = None, **vit_kwargs: Any) -> nn.Module:
    """Build a randomly initialised timm ViT that remembers how it was built.

    With ``name`` the model comes from ``timm.create_model(name, pretrained=False, **kwargs)``;
    without, from ``timm.models.vision_transformer.VisionTransformer(**kwargs)``. Either way
    :func:`kdgqa.save_pretrained` can rebuild it offline. Keyword values must be
    JSON-serialisable (numbers, strings, booleans, lists).
    """
    spec = timm_spec(name, vit_kwargs)
    model = TimmViT().build_base(spec)
    setattr(model, "kdgqa_base", spec)  # noqa: B010 (nn.Module attribute typing)
    return model.eval()
