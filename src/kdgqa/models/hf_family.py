"""The Hugging Face transformers family: one :class:`ModelFamily` for every supported vision
architecture, each described by an :class:`~kdgqa.models.hf_common.HFArchitecture` adapter.

Checkpoints, export and the registry know a family by its library, so all transformers
architectures are one family that asks its adapters which of them owns a model, an attention
module or a record. Models are recorded by class and ``config.to_dict()`` (rebuilt with the
class's own config class) and saved with ``save_pretrained``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention
from kdgqa.errors import ConversionError, SourceError
from kdgqa.models.base import Features, InputGeometry, MHAWeights, ModelFamily
from kdgqa.models.hf_beit import BeitArchitecture
from kdgqa.models.hf_clip import CLIPArchitecture
from kdgqa.models.hf_common import HFArchitecture, quiet_transformers
from kdgqa.models.hf_deit import DeiTArchitecture
from kdgqa.models.hf_dinov2 import Dinov2Architecture, Dinov2RegistersArchitecture
from kdgqa.models.hf_siglip import SiglipArchitecture
from kdgqa.models.hf_vit import ViTArchitecture

__all__ = ["ARCHITECTURES", "HFVision", "hf_classes"]

ARCHITECTURES: tuple[HFArchitecture, ...] = (
    ViTArchitecture(), DeiTArchitecture(), Dinov2Architecture(),
    Dinov2RegistersArchitecture(), CLIPArchitecture(), SiglipArchitecture(),
    BeitArchitecture(),
)


def hf_classes() -> tuple[str, ...]:
    """Every transformers model class kdgqa converts, records and loads."""
    return tuple(c for arch in ARCHITECTURES for c in arch.classes)


def _by_class(cls_name: object) -> HFArchitecture | None:
    return next((a for a in ARCHITECTURES if cls_name in a.classes), None)


def _of_model(model: nn.Module) -> HFArchitecture:
    arch = next((a for a in ARCHITECTURES if a.owns(model)), None)
    if arch is None:
        raise SourceError(f"{type(model).__name__} is not a supported transformers model; "
                          f"expected one of {', '.join(hf_classes())}")
    return arch


def _of_attention(module: nn.Module) -> HFArchitecture:
    arch = next((a for a in ARCHITECTURES if a.is_attention(module)), None)
    if arch is None:
        raise ConversionError(f"{type(module).__qualname__} is not a supported transformers "
                              "attention")
    return arch


class HFVision(ModelFamily):
    """transformers ViT, DeiT, DINOv2, CLIP/SigLIP vision towers and BEiT."""

    name = "Hugging Face vision transformers"
    library = "transformers"
    supported = ("transformers " + "/".join(a.attention for a in ARCHITECTURES)
                 + " (vision towers)")

    def owns(self, model: nn.Module) -> bool:
        return any(a.owns(model) for a in ARCHITECTURES)

    def is_attention(self, module: nn.Module) -> bool:
        return any(a.is_attention(module) for a in ARCHITECTURES)

    def keeps(self, module: nn.Module) -> bool:
        return any(a.keeps(module) for a in ARCHITECTURES)

    def read_attention(self, module: nn.Module, label: str) -> MHAWeights:
        return _of_attention(module).read_attention(module, label)

    def check_model(self, model: nn.Module, attention_paths: list[str]) -> None:
        for path in attention_paths:
            _of_attention(model.get_submodule(path)).check_layer(path)

    def grouped_attention(self, module: nn.Module, weights: MHAWeights, num_kv_heads: int,
                          scheme: str, options: dict[str, Any]) -> GroupedQueryAttention:
        return _of_attention(module).grouped_attention(module, weights, num_kv_heads, scheme,
                                                       options)

    def write_attention(self, module: nn.Module, weights: MHAWeights) -> None:
        import torch

        targets = _of_attention(module).projections(module)
        pairs = ((weights.q_weight, weights.q_bias), (weights.k_weight, weights.k_bias),
                 (weights.v_weight, weights.v_bias), (weights.o_weight, weights.o_bias))
        with torch.no_grad():
            for linear, (weight, bias) in zip(targets, pairs, strict=True):
                linear.weight.copy_(weight)
                if linear.bias is not None:
                    linear.bias.copy_(bias)

    def features(self, model: nn.Module, x: Tensor) -> Features:
        return _of_model(model).features(model, x)

    def num_classes(self, model: nn.Module) -> int | None:
        return _of_model(model).num_classes(model)

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        _of_model(model).reset_classifier(model, num_classes)

    def input_geometry(self, model: nn.Module) -> InputGeometry:
        arch = _of_model(model)
        config: Any = getattr(model, "config", None)
        size = config.image_size
        size = int(size[0] if isinstance(size, list | tuple) else size)
        return InputGeometry(int(getattr(config, "num_channels", 3)), size, list(arch.mean),
                             list(arch.std))

    def base_spec(self, model: nn.Module) -> dict[str, Any] | None:
        arch = next((a for a in ARCHITECTURES if a.owns(model)), None)
        if arch is None:
            return None
        config: Any = getattr(model, "config", None)
        return {"library": "transformers", "class": type(model).__name__,
                "config": config.to_dict(), "init_kwargs": arch.init_kwargs(model)}

    def build_base(self, spec: dict[str, Any]) -> nn.Module:
        import transformers

        cls_name = spec.get("class")
        if _by_class(cls_name) is None:
            raise SourceError(f"unsupported transformers class {cls_name!r}; expected one of "
                              f"{', '.join(hf_classes())}")
        try:
            cls = getattr(transformers, str(cls_name))
            config = cls.config_class.from_dict(dict(spec["config"]))
            init_kwargs = dict(spec.get("init_kwargs") or {})
            model: nn.Module = cls(config, **init_kwargs)
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
        """A model saved with ``save_pretrained`` in ``path`` (``config`` is its config.json)."""
        import transformers

        model_type = config.get("model_type")
        arch = next((a for a in ARCHITECTURES if model_type in a.model_types), None)
        archs = config.get("architectures") or ([arch.classes[0]] if arch else [None])
        cls_name = archs[0]
        if arch is None or cls_name not in arch.classes:
            raise SourceError(
                f"unsupported Hugging Face model in {str(path)!r}: model_type "
                f"{model_type!r}, architecture {cls_name!r}; expected one of "
                f"{', '.join(hf_classes())}"
            )
        with quiet_transformers():
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
