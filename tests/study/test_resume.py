"""What ``--resume`` accepts as the same study: the grid may grow, results-relevant settings may not."""

from __future__ import annotations

from typing import Any

import pytest

from kdgqa.study.config import parse_config
from kdgqa.study.resume import config_difference

BASE: dict[str, Any] = {"grid": {
    "schemes": ["gqa", "dgqa-ema", "kdgqa-ref"],
    "scheme_options": {"dgqa-ema": {"window_size": 10}},
    "variants": {"kdgqa-ref": {"scheme": "kdgqa", "reference": True}},
}}


def _with(**grid: Any) -> dict[str, Any]:
    return {"grid": {**BASE["grid"], **grid}}


@pytest.mark.parametrize(("changed", "expected"), [
    # A grid that gains cells (a new scheme, its options, a new variant) is the same study.
    (_with(schemes=["gqa", "dgqa-ema", "kdgqa-ref", "dgqa-diff", "pgqa-ref"],
           scheme_options={"dgqa-ema": {"window_size": 10}, "dgqa-diff": {"window_size": 5}},
           variants={"kdgqa-ref": {"scheme": "kdgqa", "reference": True},
                     "pgqa-ref": {"scheme": "pgqa", "reference": True}}), None),
    ({**BASE, "uptrain": {"sync_every": 1, "checkpoint_every": 3}}, None),
    # Anything that changes a cell that already ran is not.
    (_with(scheme_options={"dgqa-ema": {"window_size": 11}}), "grid.scheme_options.dgqa-ema"),
    (_with(scheme_options={"dgqa-ema": {"window_size": 10}, "gqa": {}}), None),
    (_with(scheme_options={"dgqa-ema": {"window_size": 10}, "kdgqa": {"min_queries": 2}}),
     "grid.scheme_options.kdgqa"),  # the base scheme of a variant that ran
    (_with(variants={"kdgqa-ref": {"scheme": "kdgqa", "reference": False}}),
     "grid.variants.kdgqa-ref"),
    ({**BASE, "uptrain": {"lr": 0.5}}, "uptrain.lr"),
])
def test_config_difference(changed: dict[str, Any], expected: str | None) -> None:
    assert config_difference(parse_config(BASE), parse_config(changed)) == expected
