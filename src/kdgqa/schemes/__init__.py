"""Allocation schemes: which KV head each query head reads.

``base`` defines what a scheme is, ``registry`` finds schemes by name, and the built-in
families live one per module: ``static`` (mha, mqa, gqa, pgqa), ``key_driven`` (kdgqa,
dgqa-ema, dgqa-diff, kdgqa-ps) and ``calibrated`` (calibrated, similarity). Importing this
package registers them, in that order.
"""

# Registration order is the order of available_schemes(): static, key-driven, calibrated.
from kdgqa.schemes import static

# isort: split
from kdgqa.schemes import key_driven

# isort: split
from kdgqa.schemes import calibrated

# isort: split
from kdgqa.schemes.base import CalibrationRequest, QueryAllocator
from kdgqa.schemes.key_driven import set_stats_reducer
from kdgqa.schemes.registry import (
    SCHEMES,
    available_schemes,
    build_allocator,
    register_scheme,
    scheme_class,
    validate_cell,
)

__all__ = [
    "SCHEMES",
    "CalibrationRequest",
    "QueryAllocator",
    "available_schemes",
    "build_allocator",
    "calibrated",
    "key_driven",
    "register_scheme",
    "scheme_class",
    "set_stats_reducer",
    "static",
    "validate_cell",
]
