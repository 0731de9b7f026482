"""kdgqa: grouped-query attention whose query allocation can be driven by the keys."""

from kdgqa.allocation import counts_to_kv_index, even_counts, proportional_counts
from kdgqa.attention import GroupedQueryAttention, start_epoch
from kdgqa.schemes import SCHEMES, QueryAllocator, available_schemes, build_allocator

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "GroupedQueryAttention",
    "QueryAllocator",
    "__version__",
    "available_schemes",
    "build_allocator",
    "counts_to_kv_index",
    "even_counts",
    "proportional_counts",
    "start_epoch",
]
