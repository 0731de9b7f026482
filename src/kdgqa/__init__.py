"""kdgqa: grouped-query attention whose query allocation can be driven by the keys.

Core: ``GroupedQueryAttention`` with schemes from ``available_schemes()``. Conversion of
pretrained timm / Hugging Face ViTs: ``convert``; checkpoints: ``save_pretrained`` / ``load``;
plain MHA export: ``export_mha``. Studies: ``run_experiment`` (``kdgqa experiment``).
"""

from kdgqa.allocation import apportion, counts_to_kv_index, even_counts, proportional_counts
from kdgqa.attention import GroupedQueryAttention, start_epoch
from kdgqa.checkpoint import load, save_pretrained
from kdgqa.config import ExperimentConfig, load_config
from kdgqa.convert import ConversionError, convert
from kdgqa.experiment import run_experiment
from kdgqa.export import export_mha
from kdgqa.report import write_report
from kdgqa.schemes import (
    SCHEMES,
    QueryAllocator,
    available_schemes,
    build_allocator,
    set_stats_reducer,
)
from kdgqa.sources import create_timm_vit, load_model

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "ConversionError",
    "ExperimentConfig",
    "GroupedQueryAttention",
    "QueryAllocator",
    "__version__",
    "apportion",
    "available_schemes",
    "build_allocator",
    "convert",
    "counts_to_kv_index",
    "create_timm_vit",
    "even_counts",
    "export_mha",
    "load",
    "load_config",
    "load_model",
    "proportional_counts",
    "run_experiment",
    "save_pretrained",
    "set_stats_reducer",
    "start_epoch",
    "write_report",
]
