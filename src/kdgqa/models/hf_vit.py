"""Hugging Face transformers' ViT family: ``ViTModel``, ``ViTForImageClassification``,
``ViTForMaskedImageModeling``.

Attention is ``ViTAttention`` in the nested layout of 4.x and early 5.x
(``attention.{query,key,value}`` + ``output.dense``) or the flat layout of later 5.x
(``q_proj/k_proj/v_proj/o_proj``), read from the installed library, never from version
strings. The replacement returns what the installed ``ViTLayer`` expects: a tuple
``(out,)``/``(out, None)`` (4.40-4.56), a tensor (4.57-5.0x) or ``(out, None)`` (flat layout).
Models are recorded by class and ``config.to_dict()`` and saved with ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ConversionError, KdgqaError, SourceError
from kdgqa.models.base import Features, InputGeometry, MHAWeights, ModelFamily

__all__ = ["HF_VIT_CLASSES", "HFViT", "HFViTGroupedAttention"]

HF_VIT_CLASSES = ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling")
OUTPUT_STYLES = ("flat", "legacy-tuple", "tensor")


def _vit_module() -> Any:
    try:
        from transformers.models.vit import modeling_vit
    except ImportError:
        return None
    return modeling_vit


def _layout(module: nn.Module) -> str:
    """``"flat"`` (q_proj...), ``"legacy-tuple"`` or ``"tensor"`` (nested layouts)."""
    if hasattr(module, "q_proj"):
        return "flat"
    params = inspect.signature(type(module).forward).parameters
    return "legacy-tuple" if "output_attentions" in params else "tensor"


def _dropout_p(module: Any) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _write(linear: Any, weight: Tensor, bias: Tensor | None) -> None:
    linear.weight.copy_(weight)
    if linear.bias is not None:
        linear.bias.copy_(bias)


class HFViTGroupedAttention(GroupedQueryAttention):
    """:class:`GroupedQueryAttention` called like transformers' ``ViTAttention``.

    ``output_style`` is what the installed ``ViTLayer`` unpacks: ``"flat"`` returns
    ``(out, None)``; ``"legacy-tuple"`` returns ``(out,)`` or ``(out, None)`` when attentions
    are requested; ``"tensor"`` returns ``out``. Attention weights are never materialised.
    """

    def __init__(self, *args: Any, output_style: str = "flat", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if output_style not in OUTPUT_STYLES:
            raise KdgqaError(f"unknown output_style {output_style!r}; valid: "
                             f"{', '.join(OUTPUT_STYLES)}")
        self.output_style = output_style

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.output_style == "flat":
            mask = args[0] if args else kwargs.get("attention_mask")
            out = super().forward(hidden_states, attn_mask=mask)
            return out, None
        head_mask = args[0] if args else kwargs.get("head_mask")
        if head_mask is not None:
            raise KdgqaError("head_mask is not supported by grouped-query attention")
        out = super().forward(hidden_states)
        if self.output_style == "tensor":
            return out
        wants = args[1] if len(args) > 1 else kwargs.get("output_attentions", False)
        return (out, None) if wants else (out,)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_style={self.output_style!r}"


class HFViT(ModelFamily):
    """transformers ``ViTModel`` and its task heads, with ``ViTAttention``."""

    name = "Hugging Face ViT"
    library = "transformers"
    supported = "transformers ViTAttention"

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ in HF_VIT_CLASSES and getattr(model, "config", None) is not None

    def is_attention(self, module: nn.Module) -> bool:
        vit = _vit_module()
        return (vit is not None and isinstance(module, vit.ViTAttention)
                and type(module).__module__ == vit.__name__)

    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        attn: Any = module
        if _layout(module) == "flat":
            q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
            heads, head_dim = int(attn.num_attention_heads), int(attn.head_dim)
            attn_drop, proj_drop = float(getattr(attn, "attention_dropout", 0.0)), 0.0
        else:
            inner, output = attn.attention, attn.output
            if getattr(attn, "pruned_heads", None):
                raise ConversionError(f"cannot convert module {label!r}: it has pruned heads")
            q, k, v, o = inner.query, inner.key, inner.value, output.dense
            heads, head_dim = int(inner.num_attention_heads), int(inner.attention_head_size)
            attn_drop = _dropout_p(getattr(inner, "dropout", None))
            proj_drop = _dropout_p(getattr(output, "dropout", None))
        linears: tuple[Any, ...] = (q, k, v, o)
        if not all(isinstance(m, nn.Linear) for m in linears):
            raise ConversionError(f"cannot convert module {label!r}: projections must be "
                                  "nn.Linear")
        width = heads * head_dim
        if any(m.out_features != width for m in (q, k, v)) or o.in_features != width:
            raise ConversionError(
                f"cannot convert module {label!r}: projections do not match {heads} heads x "
                f"{head_dim}"
            )
        if o.out_features != q.in_features:
            raise ConversionError(f"cannot convert module {label!r}: output width != input "
                                  "width")
        return MHAWeights(heads, head_dim, q.weight, k.weight, v.weight, o.weight, q.bias,
                          k.bias, v.bias, o.bias, attn_drop=attn_drop, proj_drop=proj_drop)

    def grouped_attention(self, module: nn.Module, weights: MHAWeights, num_kv_heads: int,
                          scheme: str, options: dict[str, Any]) -> GroupedQueryAttention:
        return HFViTGroupedAttention(weights.width, weights.num_heads, num_kv_heads, scheme,
                                     output_style=_layout(module), **options)

    def write_attention(self, module: nn.Module, weights: MHAWeights) -> None:
        attn: Any = module
        if hasattr(attn, "q_proj"):  # flat layout
            targets = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        else:  # nested layout
            targets = (attn.attention.query, attn.attention.key, attn.attention.value,
                       attn.output.dense)
        pairs = ((weights.q_weight, weights.q_bias), (weights.k_weight, weights.k_bias),
                 (weights.v_weight, weights.v_bias), (weights.o_weight, weights.o_bias))
        with torch.no_grad():
            for linear, (weight, bias) in zip(targets, pairs, strict=True):
                _write(linear, weight, bias)

    def features(self, model: nn.Module, x: Tensor) -> Features:
        """The class token after the final norm (what the classifier reads) and, for
        ``ViTForImageClassification``, the logits."""
        hf: Any = model
        backbone = getattr(hf, "vit", hf)
        pre_logits = backbone(x).last_hidden_state[:, 0]
        classifier = getattr(hf, "classifier", None)
        return Features(pre_logits, classifier(pre_logits) if classifier is not None else None)

    def num_classes(self, model: nn.Module) -> int | None:
        if getattr(model, "classifier", None) is None:
            return None
        config: Any = getattr(model, "config", None)
        return int(config.num_labels)

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        hf: Any = model
        if getattr(hf, "classifier", None) is None:
            raise SourceError(f"a {type(model).__name__} has no classifier to reset; use "
                              "ViTForImageClassification")
        old = hf.classifier
        hf.classifier = nn.Linear(hf.config.hidden_size, num_classes).to(
            device=old.weight.device, dtype=old.weight.dtype)
        hf.config.num_labels = num_classes
        hf.num_labels = num_classes

    def input_geometry(self, model: nn.Module) -> InputGeometry:
        config: Any = getattr(model, "config", None)
        size = config.image_size
        size = int(size[0] if isinstance(size, list | tuple) else size)
        return InputGeometry(int(getattr(config, "num_channels", 3)), size, [0.5], [0.5])

    def base_spec(self, model: nn.Module) -> dict[str, Any] | None:
        cls_name = type(model).__name__
        config = getattr(model, "config", None)
        if cls_name not in HF_VIT_CLASSES or config is None:
            return None
        hf: Any = model
        init_kwargs: dict[str, Any] = {}
        if cls_name == "ViTModel":
            init_kwargs["add_pooling_layer"] = hf.pooler is not None
            init_kwargs["use_mask_token"] = hf.embeddings.mask_token is not None
        return {"library": "transformers", "class": cls_name, "config": config.to_dict(),
                "init_kwargs": init_kwargs}

    def build_base(self, spec: dict[str, Any]) -> nn.Module:
        import transformers

        cls_name = spec.get("class")
        if cls_name not in HF_VIT_CLASSES:
            raise SourceError(f"unsupported transformers class {cls_name!r}; expected one of "
                              f"{', '.join(HF_VIT_CLASSES)}")
        try:
            config = transformers.ViTConfig.from_dict(dict(spec["config"]))
            init_kwargs = dict(spec.get("init_kwargs") or {})
            model: nn.Module = getattr(transformers, cls_name)(config, **init_kwargs)
        except Exception as error:  # malformed or inconsistent config values
            detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise SourceError(f"cannot build transformers {cls_name} from its recorded "
                              f"config: {detail or type(error).__name__}") from None
        return model

    def save_plain(self, model: nn.Module, spec: dict[str, Any], directory: Path) -> None:
        hf: Any = model
        hf.save_pretrained(str(directory))

    # ---------------------------------------------------------------- HF's own sources
    def load_directory(self, path: Path, config: dict[str, Any]) -> nn.Module:
        """A ViT saved with ``save_pretrained`` in ``path`` (``config`` is its config.json)."""
        import transformers

        archs = config.get("architectures") or ["ViTModel"]
        cls_name = archs[0]
        if config.get("model_type") != "vit" or cls_name not in HF_VIT_CLASSES:
            raise SourceError(
                f"unsupported Hugging Face model in {str(path)!r}: model_type "
                f"{config.get('model_type')!r}, architecture {cls_name!r}; expected a ViT "
                f"({', '.join(HF_VIT_CLASSES)})"
            )
        with _quiet_transformers():
            try:
                model, info = getattr(transformers, cls_name).from_pretrained(
                    str(path), local_files_only=True, output_loading_info=True)
            except Exception as error:  # corrupt weights, bad config values, shape mismatches
                first = " ".join(str(error).split())[:300] or type(error).__name__
                if "mismatch" in first:
                    first = "tensor shapes in the weights do not match its config.json"
                raise SourceError(
                    f"cannot load Hugging Face model from {str(path)!r}: {first}") from None
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
        if missing:  # transformers' own report is held back; say it in one line
            warnings.warn(f"{str(path)!r} lacks {len(missing)} weights of {cls_name} (e.g. "
                          f"{missing[0]!r}); they are randomly initialised", stacklevel=3)
        loaded: nn.Module = model
        return loaded.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hold back transformers' log records and progress bars while loading, so a failure
    prints one line (the caller summarises what matters on success)."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    handlers, bars = logger.handlers[:], hf_logging.is_progress_bar_enabled()
    logger.handlers = [logging.NullHandler()]
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.handlers = handlers
        if bars:
            hf_logging.enable_progress_bar()
