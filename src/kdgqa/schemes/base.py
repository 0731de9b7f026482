"""What every allocation scheme is: a small module that maps query heads to KV heads.

An allocator decides, on each forward pass, which KV head every query head reads
(``forward(k) -> kv_index`` of shape ``(H,)``, or ``(B, H)`` for per-input maps), and may
perturb the attention output (``perturb``). Allocators that keep state (DGQA) hold it in
buffers, so it travels with ``state_dict`` and is never global. Schemes become available by
name through :func:`kdgqa.schemes.registry.register_scheme`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdgqa.core.apportion import counts_to_kv_index, even_counts
from kdgqa.errors import SchemeError

__all__ = [
    "CalibrationRequest",
    "QueryAllocator",
    "check_divisible",
    "check_min_queries",
]


@dataclass(frozen=True)
class CalibrationRequest:
    """What a scheme that chooses its groups from data asks the conversion to measure.

    ``statistic`` prices a grouping (``kdgqa.calibration.objective``), ``equal_groups``
    forces H // G heads per group, ``uses_values`` adds the value error to the key error,
    ``max_images`` caps the calibration images and ``selection`` says how each layer's
    groups are picked among candidates (``kdgqa.calibration.plan``).
    """

    statistic: str
    equal_groups: bool
    uses_values: bool
    max_images: int
    selection: str


class QueryAllocator(nn.Module):
    """Base class: a static, even, contiguous allocation."""

    name: ClassVar[str] = ""
    #: Options a user may pass by keyword, with their defaults.
    option_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: True when the allocation is chosen from the keys at run time.
    key_driven: ClassVar[bool] = False
    #: True when the map is fixed and every KV head serves H // G contiguous query heads,
    #: which lets the attention op use SDPA's native ``enable_gqa`` path.
    uniform: bool = True
    #: True when ``kdgqa.convert`` must measure the model on calibration images first
    #: (the scheme then answers :meth:`calibration_request`).
    needs_calibration: ClassVar[bool] = False
    #: Group sizes as host ints when the map is fixed, uneven and contiguous (the query heads
    #: of KV head ``g`` are the ``host_counts[g]`` after those of ``g - 1``): the attention op
    #: can then run one native-GQA call per group size with no host sync.
    host_counts: tuple[int, ...] | None = None
    static_kv_index: Tensor

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__()
        if not 1 <= num_kv_heads <= num_heads:
            raise SchemeError(f"num_kv_heads must be in [1, num_heads={num_heads}], got "
                              f"{num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            valid = ", ".join(sorted(self.option_defaults)) or "none"
            raise SchemeError(
                f"unknown option {unknown[0]!r} for scheme {self.name!r}; valid options: {valid}"
            )
        for key, value in options.items():
            if isinstance(self.option_defaults[key], bool) and not isinstance(value, bool):
                raise SchemeError(f"option {key!r} of scheme {self.name!r} must be true or "
                                  f"false, got {value!r}")
        self.options = {**self.option_defaults, **options}
        counts = torch.tensor(even_counts(num_heads, num_kv_heads))
        self.register_buffer("static_kv_index", counts_to_kv_index(counts, num_heads),
                             persistent=False)

    def forward(self, k: Tensor) -> Tensor:
        """Return the query-head -> KV-head map for keys ``k`` of shape ``(B, G, N, D)``."""
        return self.static_kv_index

    def perturb(self, out: Tensor, kv_index: Tensor) -> Tensor:
        """Hook on the attention output ``(B, H, N, D)``; identity except for PGQA."""
        return out

    def start_epoch(self) -> None:
        """Hook for the training loop at each epoch start (only reference DGQA uses it)."""

    def fixed_kv_index(self) -> Tensor | None:
        """The map used in evaluation when it never changes (what export writes), else None.

        The base class vouches only for its own behaviour: a scheme that overrides
        ``forward`` or ``perturb`` is treated as dynamic unless it overrides this method
        too, so export never mistakes a dynamic scheme for plain GQA.
        """
        cls = type(self)
        if cls.forward is not QueryAllocator.forward or cls.perturb is not QueryAllocator.perturb:
            return None
        return self.static_kv_index

    def dynamic_reason(self) -> str:
        """Why :meth:`fixed_kv_index` is None, for the one-line export refusal."""
        return (f"scheme {self.name!r} decides its allocation or output at run time and "
                "declares no fixed map")

    def calibration_request(self) -> CalibrationRequest | None:
        """What to measure when ``needs_calibration``; None for every other scheme."""
        return None

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}{opts}"


def check_divisible(name: str, num_heads: int, num_kv_heads: int) -> None:
    """Raise :class:`SchemeError` unless ``num_kv_heads`` divides ``num_heads``."""
    if num_heads % num_kv_heads:
        divisors = [g for g in range(1, num_heads + 1) if num_heads % g == 0]
        raise SchemeError(
            f"scheme {name!r} needs num_heads divisible by num_kv_heads, got "
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}; valid num_kv_heads: "
            f"{divisors} (key-driven schemes accept uneven groups)"
        )


def check_min_queries(name: str, min_queries: Any, num_heads: int, num_kv_heads: int) -> None:
    """Raise :class:`SchemeError` unless every KV head can get ``min_queries`` query heads."""
    limit = num_heads // num_kv_heads
    if isinstance(min_queries, bool) or not isinstance(min_queries, int) or not (
        0 <= min_queries <= limit
    ):
        raise SchemeError(
            f"scheme {name!r}: min_queries must be an integer in [0, {limit}] for "
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}; got {min_queries!r}"
        )
