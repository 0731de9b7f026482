"""kdgqa: grouped-query attention whose query allocation can be driven by the keys.

Core: ``GroupedQueryAttention`` with schemes from ``available_schemes()`` (add one with
``register_scheme``). Conversion of pretrained timm / Hugging Face ViTs: ``convert``;
checkpoints: ``save_pretrained`` / ``load``; plain MHA export: ``export_mha``; native timm GQA
export (fewer K/V heads on disk): ``export_native``. Studies:
``run_experiment`` (``kdgqa experiment``). Errors on bad input: ``KdgqaError``.

Names are imported on first use, so ``import kdgqa`` (and the CLI's ``--help``) loads
neither torch nor the study stack until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdgqa.version import __version__

if TYPE_CHECKING:
    from kdgqa.attention import GroupedQueryAttention, start_epoch
    from kdgqa.conversion.converter import convert
    from kdgqa.core.apportion import (
        apportion,
        counts_to_kv_index,
        even_counts,
        proportional_counts,
    )
    from kdgqa.errors import (
        CheckpointError,
        ConfigError,
        ConversionError,
        CorruptFileError,
        DatasetError,
        ExportError,
        KdgqaError,
        SchemeError,
        SourceError,
    )
    from kdgqa.io.checkpoint import load, save_pretrained
    from kdgqa.io.export import export_mha
    from kdgqa.io.export_native import export_native
    from kdgqa.io.sources import load_model
    from kdgqa.models.base import ModelFamily
    from kdgqa.models.registry import register_model_family
    from kdgqa.models.timm_eva import create_timm_eva
    from kdgqa.models.timm_vit import create_timm_vit
    from kdgqa.schemes.base import QueryAllocator
    from kdgqa.schemes.key_driven import set_stats_reducer
    from kdgqa.schemes.registry import (
        SCHEMES,
        available_schemes,
        build_allocator,
        register_scheme,
        validate_cell,
    )
    from kdgqa.study.config import ExperimentConfig, load_config
    from kdgqa.study.experiment import run_experiment
    from kdgqa.study.report import write_report

#: Public name -> the module that defines it.
_WHERE = {
    "GroupedQueryAttention": "kdgqa.attention",
    "start_epoch": "kdgqa.attention",
    "convert": "kdgqa.conversion.converter",
    "apportion": "kdgqa.core.apportion",
    "counts_to_kv_index": "kdgqa.core.apportion",
    "even_counts": "kdgqa.core.apportion",
    "proportional_counts": "kdgqa.core.apportion",
    **dict.fromkeys(("CheckpointError", "ConfigError", "ConversionError", "CorruptFileError",
                     "DatasetError", "ExportError", "KdgqaError", "SchemeError",
                     "SourceError"), "kdgqa.errors"),
    "load": "kdgqa.io.checkpoint",
    "save_pretrained": "kdgqa.io.checkpoint",
    "export_mha": "kdgqa.io.export",
    "export_native": "kdgqa.io.export_native",
    "load_model": "kdgqa.io.sources",
    "ModelFamily": "kdgqa.models.base",
    "register_model_family": "kdgqa.models.registry",
    "create_timm_eva": "kdgqa.models.timm_eva",
    "create_timm_vit": "kdgqa.models.timm_vit",
    "QueryAllocator": "kdgqa.schemes.base",
    "set_stats_reducer": "kdgqa.schemes.key_driven",
    "SCHEMES": "kdgqa.schemes.registry",
    "available_schemes": "kdgqa.schemes.registry",
    "build_allocator": "kdgqa.schemes.registry",
    "register_scheme": "kdgqa.schemes.registry",
    "validate_cell": "kdgqa.schemes.registry",
    "ExperimentConfig": "kdgqa.study.config",
    "load_config": "kdgqa.study.config",
    "run_experiment": "kdgqa.study.experiment",
    "write_report": "kdgqa.study.report",
}

__all__ = [
    "SCHEMES",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "CorruptFileError",
    "DatasetError",
    "ExperimentConfig",
    "ExportError",
    "GroupedQueryAttention",
    "KdgqaError",
    "ModelFamily",
    "QueryAllocator",
    "SchemeError",
    "SourceError",
    "__version__",
    "apportion",
    "available_schemes",
    "build_allocator",
    "convert",
    "counts_to_kv_index",
    "create_timm_eva",
    "create_timm_vit",
    "even_counts",
    "export_mha",
    "export_native",
    "load",
    "load_config",
    "load_model",
    "proportional_counts",
    "register_model_family",
    "register_scheme",
    "run_experiment",
    "save_pretrained",
    "set_stats_reducer",
    "start_epoch",
    "validate_cell",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kdgqa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
