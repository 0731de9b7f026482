"""Recording how a model was built, and building it again offline from that record.

Every model kdgqa builds or loads remembers its record (``model.kdgqa_base``); for any other
model the family (:mod:`kdgqa.models`) reads one back, and it is checked by rebuilding the
structure, so a checkpoint never records an architecture that would rebuild differently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdgqa.conversion.converter import convert
from kdgqa.errors import SourceError
from kdgqa.models.registry import families, family_for_library

__all__ = ["base_spec", "build_base"]


def build_base(spec: dict[str, Any]) -> nn.Module:
    """Build the randomly initialised base (MHA) model described by ``spec``, offline."""
    if not isinstance(spec, dict):
        raise SourceError(f"a base-model record must be a mapping, got {spec!r}")
    model = family_for_library(spec.get("library")).build_base(spec)
    setattr(model, "kdgqa_base", dict(spec))  # noqa: B010 (nn.Module attribute typing)
    return model.eval()


def _check_rebuild(spec: dict[str, Any], model: nn.Module) -> None:
    """Rebuild ``spec`` on the meta device and insist it has ``model``'s structure."""
    conversion = getattr(model, "kdgqa_conversion", None)
    with torch.device("meta"):
        rebuilt = build_base(spec)
        if conversion is not None:
            convert(rebuilt, conversion["scheme"], conversion["num_kv_heads"],
                    **conversion["scheme_options"])
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if theirs != ours or repr(rebuilt) != repr(model):
        raise SourceError(
            f"cannot record how to rebuild this {type(model).__name__}: rebuilding it from "
            f"{spec} gives a different structure; build it with kdgqa.create_timm_vit(...) or "
            "load it through kdgqa.load_model"
        )


def base_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON description that :func:`build_base` turns back into ``model``'s base.

    Uses ``model.kdgqa_base`` when kdgqa built or loaded the model; otherwise asks the model
    families to read one from it, verified by rebuilding the structure.
    """
    spec = getattr(model, "kdgqa_base", None)
    if spec is not None:
        return dict(spec)
    for family in families():
        spec = family.base_spec(model)
        if spec is not None:
            _check_rebuild(spec, model)
            return spec
    raise SourceError(
        f"cannot save a {type(model).__name__}: expected a model of one of the families "
        + ", ".join(f.name for f in families())
        + ", or one built by kdgqa.create_timm_vit(NAME, ...) / create_timm_eva or load_model"
    )
