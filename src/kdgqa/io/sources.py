"""Where models come from: a source string resolved to a model, offline where it can be.

A *source* (the CLI's ``--model``) is one of

* ``timm:NAME`` -- a timm model with its pretrained weights (downloaded when online);
* a local timm checkpoint file (``.safetensors``, ``.pth``/``.pt``/``.bin``); its architecture
  comes from ``arch=``/``model_kwargs=`` or from a timm ``config.json`` beside it;
* a directory: a kdgqa checkpoint (``kdgqa_config.json``), a Hugging Face directory of a
  supported architecture (``config.json`` with ``model_type`` vit, deit, dinov2, beit,
  clip_vision_model, siglip_vision_model, ...) or a timm export (``config.json`` with
  ``architecture``).

Every model loaded here remembers how it was built (``model.kdgqa_base``), which is what
:mod:`kdgqa.io.checkpoint` writes so the base model can be rebuilt offline. Pickles are
loaded with ``weights_only=True`` only; anything needing arbitrary objects is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from kdgqa.errors import SourceError
from kdgqa.io.base import build_base
from kdgqa.io.checkpoint import CONFIG_NAME, load
from kdgqa.io.weights import load_weights, read_state_dict
from kdgqa.models.hf_family import HFVision
from kdgqa.models.timm_vit import TimmViT, jsonable, timm_spec

__all__ = ["CHECKPOINT_SUFFIXES", "load_model"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{str(path)!r} does not hold a JSON object")
    return data


def _timm_from_file(
    path: Path, arch: str | None, model_kwargs: dict[str, Any] | None
) -> nn.Module:
    if arch is not None:
        spec = timm_spec(arch, model_kwargs)
    elif (path.parent / "config.json").is_file():
        config = path.parent / "config.json"
        spec = TimmViT().spec_from_config(config, _read_json(config))
        spec["kwargs"].update(jsonable(dict(model_kwargs or {})))
    else:
        raise SourceError(
            f"cannot tell the architecture of {str(path)!r}: pass arch= (CLI: --arch NAME) or "
            "put a timm config.json (architecture, model_args) beside it"
        )
    state_dict = read_state_dict(path)
    model = build_base(spec)
    load_weights(model, state_dict, repr(str(path)))
    return model


def load_model(
    source: str,
    *,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Resolve a source string to a model in eval mode (see the module docstring)."""
    if not isinstance(source, str) or not source:
        raise SourceError(f"model source must be a non-empty string, got {source!r}")
    if source.startswith("timm:"):
        if model_kwargs:
            raise SourceError("model arguments apply to checkpoint files, not to timm: names")
        return TimmViT().load_pretrained(source[len("timm:"):])
    path = Path(source)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return load(path)
        config = path / "config.json"
        if not config.is_file():
            raise SourceError(
                f"directory {source!r} holds neither kdgqa_config.json nor config.json"
            )
        data = _read_json(config)
        if "architecture" in data:
            weights = path / "model.safetensors"
            if not weights.is_file():
                weights = path / "pytorch_model.bin"
            return _timm_from_file(weights, arch, model_kwargs)
        return HFVision().load_directory(path, data)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise SourceError(f"checkpoint file {source!r} does not exist")
        return _timm_from_file(path, arch, model_kwargs)
    if path.exists():
        raise SourceError(
            f"unsupported model file {source!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    raise SourceError(
        f"unknown model {source!r}: expected timm:NAME, a checkpoint file "
        f"({', '.join(CHECKPOINT_SUFFIXES)}) or a model directory"
    )
