"""Numerical robustness of the key statistics and the allocation.

Whatever the keys hold (NaN, +-inf, zeros, fp16 values whose squares overflow fp16, bf16
values that differ below bf16 resolution once squared), the default allocation is valid:
integer counts, each >= ``min_queries``, summing to H, and a head map with entries in [0, G).
Defined fallbacks (documented in ``proportional_counts`` and docs/reliability.md): NaN and negative
scores count as zero, +inf scores share the spare heads equally, all-zero scores split evenly,
and DGQA skips a window whose key norms are not finite. NaN inputs are reported where that is
the right answer: the training loop stops with ``TrainingDiverged`` naming the step, and the
official (``reference=True``) arithmetic raises a ``ValueError`` instead of hanging.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdgqa.attention import GroupedQueryAttention
from kdgqa.core.apportion import apportion, counts_to_kv_index, key_norms, proportional_counts

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 1.0, 1e-30]


def _assert_valid(counts: torch.Tensor, kv_index: torch.Tensor | None, heads: int,
                  min_queries: int) -> None:
    groups = counts.shape[-1]
    assert counts.dtype == torch.int64
    assert bool((counts >= min_queries).all()), counts
    assert bool((counts.sum(-1) == heads).all()), counts
    if kv_index is not None:
        assert kv_index.shape[-1] == heads and kv_index.dtype == torch.int64
        assert bool(((kv_index >= 0) & (kv_index < groups)).all()), kv_index
        assert bool((kv_index.diff(dim=-1) >= 0).all())  # contiguous runs
        for row_counts, row_index in zip(counts.reshape(-1, groups),
                                         kv_index.reshape(-1, heads), strict=True):
            assert torch.equal(torch.bincount(row_index, minlength=groups), row_counts)


@st.composite
def score_cases(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    groups = draw(st.integers(1, 12))
    heads = draw(st.integers(groups, 48))
    min_queries = draw(st.integers(0, heads // groups))
    rows = draw(st.integers(1, 3))
    elements = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from(SPECIAL)
    scores = draw(arrays(np.float32, (rows, groups), elements=elements))
    return scores, heads, min_queries


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=score_cases())
def test_any_scores_give_a_valid_allocation(case: tuple[np.ndarray, int, int]) -> None:
    scores, heads, min_queries = case
    tensor = torch.from_numpy(scores)
    counts, kv_index = apportion(tensor, heads, min_queries)
    _assert_valid(counts, kv_index, heads, min_queries)
    counts, kv_index = apportion(tensor, heads, min_queries, reduce_rows=True)
    _assert_valid(counts, kv_index, heads, min_queries)
    assert counts.shape == (1, scores.shape[1])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        _assert_valid(proportional_counts(tensor.to(dtype), heads, min_queries), None, heads,
                      min_queries)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=score_cases())
def test_finite_scores_are_apportioned_within_one_of_their_quota(
    case: tuple[np.ndarray, int, int]
) -> None:
    scores, heads, min_queries = case
    clean = np.nan_to_num(scores.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    clean = np.clip(clean, 0.0, None)
    counts = proportional_counts(torch.from_numpy(clean.astype(np.float32)), heads, min_queries)
    spare = heads - min_queries * scores.shape[1]
    for row, row_counts in zip(clean, counts.numpy(), strict=True):
        total = row.sum()
        quota = row / total * spare if total > 0 else np.full_like(row, spare / row.size)
        assert np.all(np.abs(row_counts - min_queries - quota) < 1 + 1e-4), (row, row_counts)


@pytest.mark.parametrize(("scores", "expected"), [
    ([math.nan, math.nan, math.nan], [2, 2, 2]),  # NaN counts as zero: even split
    ([0.0, 0.0, 0.0], [2, 2, 2]),
    ([math.inf, 1.0, 2.0], [4, 1, 1]),  # +inf takes the spare heads
    ([math.inf, math.inf, 5.0], [3, 2, 1]),  # several +inf share them, ties to the lower
    ([-math.inf, -1.0, 3.0], [1, 1, 4]),  # negatives count as zero
    ([math.nan, 1.0, 1.0], [1, 3, 2]),
    ([3.4e38, 3.4e38, 0.0], [3, 2, 1]),  # near float max: no overflow in the sum
    ([1e-45, 0.0, 0.0], [4, 1, 1]),  # subnormal still counts
])
def test_documented_fallbacks(scores: list[float], expected: list[int]) -> None:
    assert proportional_counts(torch.tensor(scores), 6, 1).tolist() == expected


def test_fp16_keys_whose_squares_overflow_fp16() -> None:
    """|k| = 300: k**2 = 9e4 > fp16 max (65504), so an fp16 norm overflows; ours does not."""
    keys = torch.full((2, 3, 197, 64), 300.0, dtype=torch.float16)
    keys[:, 1] = 100.0
    keys[:, 2] = -600.0
    naive = (keys * keys).sum(dim=(2, 3))
    assert not bool(torch.isfinite(naive).all())  # what computing in fp16 would give
    norms = key_norms(keys)
    exact = torch.linalg.vector_norm(keys.double(), dim=(2, 3)).sum(0)
    assert bool(torch.isfinite(norms).all()) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), exact, rtol=1e-5, atol=0)
    assert proportional_counts(norms, 12).tolist() == proportional_counts(exact, 12).tolist()


def test_bf16_keys_keep_differences_below_bf16_resolution() -> None:
    """Two heads whose norms differ by 0.4 % (below bf16's 0.8 % step) must still be ordered,
    because the norms are accumulated and returned in fp32."""
    torch.manual_seed(0)
    base = torch.randn(4, 1, 197, 64).to(torch.bfloat16)
    keys = torch.cat([base, base, base], dim=1)
    keys[:, 1, :, :32] = (base[:, 0, :, :32].float() * 1.008).to(torch.bfloat16)
    norms = key_norms(keys)
    exact = torch.linalg.vector_norm(keys.double(), dim=(2, 3)).sum(0)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-5, atol=0)
    assert norms[1] > norms[0] and norms[0] == norms[2]
    assert torch.equal(proportional_counts(norms, 12), proportional_counts(exact, 12))
    assert norms.to(torch.bfloat16)[1] == norms.to(torch.bfloat16)[0]  # bf16 would tie them


@pytest.mark.parametrize("scheme", ["kdgqa", "dgqa-ema", "dgqa-diff"])
@pytest.mark.parametrize("poison", ["nan", "inf", "zeros", "huge"])
def test_attention_allocation_stays_valid_on_bad_inputs(scheme: str, poison: str) -> None:
    torch.manual_seed(0)
    options = {"window_size": 1} if scheme.startswith("dgqa") else {}
    attn = GroupedQueryAttention(48, 6, 4, scheme=scheme, **options).train()
    x = torch.randn(2, 5, 48)
    attn(x)  # one good window first
    state = {k: v.clone() for k, v in attn.allocator.state_dict().items()}
    bad = {"nan": x.clone().index_fill_(1, torch.tensor([2]), math.nan),
           "inf": x.clone().index_fill_(1, torch.tensor([2]), math.inf),
           "zeros": torch.zeros_like(x),
           "huge": x * 1e30}[poison]
    for mode in ("train", "eval"):
        attn.train(mode == "train")
        out = attn(bad)
        kv_index = attn.last_kv_index
        assert kv_index is not None
        counts = torch.bincount(kv_index, minlength=4)
        _assert_valid(counts, kv_index, 6, 1)
        if poison == "zeros":
            assert bool(torch.isfinite(out).all())
    if scheme.startswith("dgqa"):
        cache = attn.allocator.cache
        assert bool(torch.isfinite(cache).all()), "a bad batch poisoned the DGQA state"
        if poison in ("nan", "inf", "huge"):  # that window was skipped: state unchanged
            for key, value in state.items():
                assert torch.equal(attn.allocator.state_dict()[key], value) or key == "step"
    attn.train()
    attn(x)  # and the next good batch is used as usual
    assert bool(torch.isfinite(attn.allocator.state_dict().get("cache", torch.zeros(1))).all())


def test_half_precision_module_allocates_from_fp32_statistics() -> None:
    torch.manual_seed(0)
    attn = GroupedQueryAttention(48, 6, 4, scheme="kdgqa")
    with torch.no_grad():
        attn.qkv.weight.mul_(400.0)  # keys around 1e3: squares overflow fp16
    x = torch.randn(2, 5, 48)
    expected = attn.eval()(x)
    reference_index = attn.last_kv_index
    attn.half()
    out = attn(x.half())
    assert attn.last_kv_index is not None and reference_index is not None
    _assert_valid(torch.bincount(attn.last_kv_index, minlength=4), attn.last_kv_index, 6, 1)
    assert torch.equal(attn.last_kv_index, reference_index)
    assert out.shape == expected.shape


@pytest.mark.parametrize("scheme", ["kdgqa", "dgqa-diff"])
def test_reference_arithmetic_reports_nan_instead_of_hanging(scheme: str) -> None:
    attn = GroupedQueryAttention(48, 6, 3, scheme=scheme, reference=True).train()
    x = torch.randn(2, 5, 48)
    x[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="not all finite"):
        attn(x)


def test_head_map_of_counts_with_empty_runs() -> None:
    counts = torch.tensor([[0, 6, 0], [2, 2, 2], [6, 0, 0]])
    index = counts_to_kv_index(counts, 6)
    assert index.tolist() == [[1] * 6, [0, 0, 1, 1, 2, 2], [0] * 6]


def test_nan_loss_is_reported_with_its_step(tmp_path: object) -> None:
    """End to end: NaN images stop training with a clear TrainingDiverged, nothing saved."""
    from pathlib import Path

    from kdgqa.conversion.converter import convert
    from kdgqa.models.timm_vit import create_timm_vit
    from kdgqa.study.config import TrainConfig
    from kdgqa.study.data import Batches, ImageTensors
    from kdgqa.study.train import TrainingDiverged, train

    torch.manual_seed(0)
    model = convert(create_timm_vit(img_size=8, patch_size=2, in_chans=1, num_classes=4,
                                    embed_dim=12, depth=1, num_heads=3), "dgqa-ema", 2,
                    window_size=1)
    data = ImageTensors(torch.zeros(64, 1, 8, 8, dtype=torch.uint8), torch.zeros(64).long())
    batches = Batches(data, 32, image_size=8, std=0.0 + 1e-45)  # (x - mean) / ~0 -> -inf
    with pytest.raises(TrainingDiverged, match="at step 0"):
        train(model, batches, None, TrainConfig(epochs=1, lr=1e-3), run_dir=Path(str(tmp_path)),
              progress=False)
    allocator = model.blocks[0].attn.allocator
    assert bool(torch.isfinite(allocator.cache).all())
    assert not (Path(str(tmp_path)) / "checkpoint.pt").exists()


@pytest.mark.parametrize("scheme", ["calibrated", "similarity"])
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_calibration_on_non_finite_images_is_refused(scheme: str, poison: float) -> None:
    """Groups chosen from NaN statistics would be arbitrary: say so instead."""
    from conftest import TINY_VIT
    from kdgqa.conversion.converter import convert
    from kdgqa.errors import ConversionError
    from kdgqa.models.timm_vit import create_timm_vit

    torch.manual_seed(0)
    model = create_timm_vit(**TINY_VIT)
    images = torch.randn(4, 3, 32, 32)
    images[1, 0, 3, 3] = poison
    with pytest.raises(ConversionError, match="not finite"):
        convert(model, scheme, 3, calibration=images)
    assert not any(isinstance(m, GroupedQueryAttention) for m in model.modules())


def test_calibration_normalisation_must_be_finite(tmp_path: object) -> None:
    from kdgqa.study.calibration_images import load_calibration
    from kdgqa.study.data import DatasetError

    for mean, std in (((math.nan,), (0.5,)), ((0.5,), (0.0,)), ((0.5,), (math.inf,))):
        with pytest.raises(DatasetError, match="finite with std > 0"):
            load_calibration("digits", 4, image_size=8, channels=1, mean=mean, std=std)
