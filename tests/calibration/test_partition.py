"""Partitions of heads into KV-head groups: the pooling loss and the search (kdgqa.partition)."""

from __future__ import annotations

import numpy as np
import pytest

from kdgqa.calibration.partition import PoolingObjective, count_partitions, search_partition
from reference import all_partitions


def _weighted_instance(heads: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head activations a (H, T, D), PSD weights M (H, D, D), and their T tensor."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(3, 20, 4))
    a = base[rng.integers(0, 3, heads)] + rng.normal(size=(heads, 20, 4)) * rng.uniform(0.1, 2)
    m = rng.normal(size=(heads, 4, 4))
    m = m @ m.transpose(0, 2, 1)
    terms = np.einsum("iab,jtb,lta->ijl", m, a, a)  # tr(M_i sum_t a_j a_l^T)
    return a, m, terms


def _direct_loss(a: np.ndarray, m: np.ndarray, groups: list[list[int]]) -> float:
    loss = 0.0
    for group in groups:
        mean = a[group].mean(0)
        for i in group:
            d = a[i] - mean
            loss += float(np.einsum("ta,ab,tb->", d, m[i], d))
    return loss


@pytest.mark.parametrize("seed", range(3))
def test_group_cost_is_the_exact_pooling_loss(seed):
    a, m, terms = _weighted_instance(6, seed)
    objective = PoolingObjective(terms)
    for groups in ([[0, 1, 2, 3, 4, 5]], [[0, 3], [1, 2, 5], [4]], [[h] for h in range(6)]):
        assert objective.total(groups) == pytest.approx(_direct_loss(a, m, groups), rel=1e-10)


@pytest.mark.parametrize(("heads", "groups", "equal"),
                         [(6, 2, False), (6, 3, False), (6, 4, False), (6, 3, True), (6, 2, True)])
@pytest.mark.parametrize("seed", range(3))
def test_exhaustive_search_finds_the_brute_force_optimum(heads, groups, equal, seed):
    a, m, terms = _weighted_instance(heads, seed)
    candidates = all_partitions(heads, groups, equal)
    assert len(candidates) == count_partitions(heads, groups, equal)
    best = min(_direct_loss(a, m, c) for c in candidates)
    found = search_partition(terms, groups, equal=equal)
    assert sorted(h for g in found for h in g) == list(range(heads)) and len(found) == groups
    assert not equal or {len(g) for g in found} == {heads // groups}
    assert _direct_loss(a, m, found) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize(("heads", "groups", "equal"), [(8, 3, False), (8, 4, True), (7, 2, False)])
@pytest.mark.parametrize("seed", range(4))
def test_local_search_reaches_the_optimum_on_small_problems(heads, groups, equal, seed):
    a, m, terms = _weighted_instance(heads, seed)
    best = min(_direct_loss(a, m, c) for c in all_partitions(heads, groups, equal))
    found = search_partition(terms, groups, equal=equal, exhaustive_limit=0)
    assert _direct_loss(a, m, found) == pytest.approx(best, rel=1e-9)
    assert found == search_partition(terms, groups, equal=equal, exhaustive_limit=0)  # seeded


def test_search_refuses_impossible_groupings():
    terms = _weighted_instance(6, 0)[2]
    with pytest.raises(ValueError, match="divisible"):
        search_partition(terms, 4, equal=True)
    with pytest.raises(ValueError, match="num_groups"):
        search_partition(terms, 7)
