"""Allocation arithmetic: sound apportionment invariants and the official transcriptions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kdgqa.core.apportion import (
    apportion,
    counts_to_kv_index,
    even_counts,
    key_norms,
    proportional_counts,
    reference_dgqa_counts,
    reference_kdgqa_counts,
)

any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
finite_positive = st.floats(min_value=0.0625, max_value=8192.0, allow_nan=False, width=32)


@st.composite
def heads_and_scores(draw, elements=any_float):
    kv_heads = draw(st.integers(1, 8))
    heads = draw(st.integers(kv_heads, 24))
    min_queries = draw(st.integers(0, heads // kv_heads))
    scores = draw(st.lists(elements, min_size=kv_heads, max_size=kv_heads))
    return heads, min_queries, torch.tensor(scores, dtype=torch.float32)


@settings(max_examples=300, deadline=None)
@given(heads_and_scores())
def test_counts_are_always_valid(case):
    heads, min_queries, scores = case
    counts = proportional_counts(scores, heads, min_queries)
    assert int(counts.sum()) == heads
    assert bool((counts >= min_queries).all())
    assert torch.equal(counts, proportional_counts(scores.clone(), heads, min_queries))


@settings(max_examples=200, deadline=None)
@given(heads_and_scores(finite_positive))
def test_counts_are_within_one_of_the_exact_quota(case):
    heads, min_queries, scores = case
    counts = proportional_counts(scores, heads, min_queries).double()
    spare = heads - len(scores) * min_queries
    quota = min_queries + scores.double() / scores.double().sum() * spare
    assert bool(((counts - quota).abs() < 1 + 1e-4).all())


def test_degenerate_scores_split_evenly_or_to_the_infinite_heads():
    assert proportional_counts(torch.zeros(3), 7).tolist() == [3, 2, 2]
    assert proportional_counts(torch.tensor([float("nan")] * 3), 6).tolist() == [2, 2, 2]
    inf = float("inf")
    assert proportional_counts(torch.tensor([inf, 1.0, inf]), 8, 1).tolist() == [4, 1, 3]
    assert proportional_counts(torch.tensor([5.0]), 12).tolist() == [12]
    assert proportional_counts(torch.tensor([3.4e38, 3.4e38, 1.0]), 6, 0).tolist() == [3, 3, 0]


def test_batched_rows_are_independent():
    scores = torch.tensor([[1.0, 1.0, 4.0], [4.0, 1.0, 1.0]])
    assert proportional_counts(scores, 6).tolist() == [[2, 1, 3], [3, 2, 1]]


def test_kv_index_is_contiguous_runs():
    counts = torch.tensor([0, 3, 1, 2])
    assert counts_to_kv_index(counts, 6).tolist() == [1, 1, 1, 2, 3, 3]
    batched = torch.tensor([[2, 1], [1, 2]])
    assert counts_to_kv_index(batched, 3).tolist() == [[0, 0, 1], [0, 1, 1]]


def test_even_counts():
    assert even_counts(12, 5) == [3, 3, 2, 2, 2]
    assert even_counts(6, 6) == [1] * 6


def test_apportion_reduces_rows_like_a_batch_sum():
    norms = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 9.0]])
    counts, index = apportion(norms, 8, 1, reduce_rows=True)
    assert counts.tolist() == proportional_counts(norms.sum(0, keepdim=True), 8).tolist()
    assert index.tolist() == counts_to_kv_index(counts, 8).tolist()


def test_key_norms_are_fp32_frobenius_norms():
    k = torch.randn(2, 3, 5, 4, dtype=torch.bfloat16)
    per_sample = key_norms(k, per_sample=True)
    assert per_sample.dtype == torch.float32 and per_sample.shape == (2, 3)
    torch.testing.assert_close(per_sample, k.float().flatten(2).norm(dim=-1))
    torch.testing.assert_close(key_norms(k), per_sample.sum(0))


# --- transcriptions of the official code (arXiv 2408.08454, key-driven-gqa) ---------------


def official_kdgqa(norms: torch.Tensor, heads: int) -> list[int]:
    k_norms = norms.clone()
    k_norms = (k_norms - k_norms.min()) / (k_norms.max() - k_norms.min())
    alloc = (k_norms / k_norms.sum() * heads).round().int()
    while alloc.sum() > heads:
        alloc[torch.argmax(alloc)] -= 1
    while alloc.sum() < heads:
        alloc[torch.argmin(alloc)] += 1
    return alloc.tolist()


def official_dgqa(scores: torch.Tensor, heads: int) -> list[int]:
    ratios = ((scores / scores.sum(dim=0)) * heads).round().int()
    while ratios.sum() > heads:
        idx = torch.randint(0, ratios.size(0), (1,)).item()
        if ratios[idx] > 0:
            ratios[idx] -= 1
    while ratios.sum() < heads:
        idx = torch.randint(0, ratios.size(0), (1,)).item()
        ratios[idx] += 1
    return ratios.tolist()


@settings(max_examples=300, deadline=None)
@given(heads_and_scores(finite_positive))
def test_reference_kdgqa_equals_the_official_algorithm(case):
    heads, _, norms = case
    assume(len(norms) >= 2 and bool(norms.max() > norms.min()))
    assert reference_kdgqa_counts(norms, heads) == official_kdgqa(norms, heads)


@settings(max_examples=300, deadline=None)
@given(heads_and_scores(finite_positive), st.integers(0, 2**31 - 1))
def test_reference_dgqa_equals_the_official_algorithm(case, seed):
    heads, _, scores = case
    torch.manual_seed(seed)
    expected = official_dgqa(scores, heads)
    torch.manual_seed(seed)
    assert reference_dgqa_counts(scores, heads) == expected


def test_reference_kdgqa_starves_the_smallest_head_as_published():
    assert reference_kdgqa_counts(torch.tensor([1.0, 2.0, 3.0]), 6)[0] == 0
    assert reference_kdgqa_counts(torch.tensor([1.0, 2.0]), 6) == [0, 6]


@pytest.mark.parametrize("norms", [[2.0, 2.0, 2.0], [7.0], [1.0, float("nan")], [1.0, float("inf")]])
def test_reference_kdgqa_raises_where_the_official_code_never_finishes(norms):
    with pytest.raises(ValueError, match="reference"):
        reference_kdgqa_counts(torch.tensor(norms), 6)


def test_reference_dgqa_raises_on_zero_scores():
    with pytest.raises(ValueError, match="summing to 0"):
        reference_dgqa_counts(torch.zeros(3), 6)
