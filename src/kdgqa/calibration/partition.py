"""Partitions of attention heads into KV-head groups: what a partition loses when each
group is mean-pooled into one KV head, and the search for the partition that loses least.

The loss comes from the ``(H, H, H)`` terms of
:func:`kdgqa.calibration.objective.pooling_terms`; the search enumerates every partition
when they are few (H = 6: 31 for G = 2, 90 for G = 3), else runs steepest-descent moves and
swaps from an agglomerative start plus seeded random restarts, so a given model and
calibration set always give the same groups.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator

import numpy as np

from kdgqa.core.apportion import even_counts
from kdgqa.errors import SchemeError

__all__ = [
    "EXHAUSTIVE_LIMIT",
    "PoolingObjective",
    "canonical",
    "contiguous_groups",
    "count_partitions",
    "search_partition",
]

#: Enumerate every partition when there are at most this many; search locally otherwise.
EXHAUSTIVE_LIMIT = 100_000
#: Random restarts of the local search, drawn from a generator with this fixed seed.
RESTARTS = 16
SEED = 0


class PoolingObjective:
    """Loss of mean-pooling groups of heads, from the terms of
    :func:`kdgqa.calibration.objective.pooling_terms`."""

    def __init__(self, terms: np.ndarray) -> None:
        if terms.ndim != 3 or len(set(terms.shape)) != 1:
            raise SchemeError(f"terms must be (H, H, H), got {terms.shape}")
        self.terms = np.asarray(terms, dtype=np.float64)
        self.num_heads = terms.shape[0]
        self._diag = np.einsum("iii->i", self.terms)
        self._pair = np.einsum("iij->ij", self.terms)
        self._cache: dict[int, float] = {}

    def cost(self, group: Iterable[int]) -> float:
        """What pooling the heads of ``group`` into one KV head loses."""
        members = sorted(group)
        key = sum(1 << h for h in members)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        idx = np.asarray(members)
        size = len(members)
        value = float(
            self._diag[idx].sum()
            - 2.0 / size * self._pair[np.ix_(idx, idx)].sum()
            + self.terms[np.ix_(idx, idx, idx)].sum() / size**2
        )
        self._cache[key] = value
        return value

    def total(self, groups: Iterable[Iterable[int]]) -> float:
        return sum(self.cost(g) for g in groups)


# --------------------------------------------------------------------------------------------
# The search


def count_partitions(num_heads: int, num_groups: int, equal: bool = False) -> int:
    """Partitions of ``num_heads`` heads into ``num_groups`` non-empty (equal) groups."""
    if equal:
        size = num_heads // num_groups
        return math.factorial(num_heads) // (
            math.factorial(size) ** num_groups * math.factorial(num_groups))
    # Stirling numbers of the second kind, S(n, k) = k S(n-1, k) + S(n-1, k-1).
    row = [1] + [0] * num_groups
    for _ in range(num_heads):
        row = [0] + [k * row[k] + row[k - 1] for k in range(1, num_groups + 1)]
    return row[num_groups]


def _partitions(num_heads: int, num_groups: int) -> Iterator[list[list[int]]]:
    groups: list[list[int]] = []

    def place(head: int) -> Iterator[list[list[int]]]:
        if head == num_heads:
            if len(groups) == num_groups:
                yield [list(g) for g in groups]
            return
        if num_groups - len(groups) > num_heads - head:
            return  # too few heads left to open the missing groups
        for group in groups:
            group.append(head)
            yield from place(head + 1)
            group.pop()
        if len(groups) < num_groups:
            groups.append([head])
            yield from place(head + 1)
            groups.pop()

    yield from place(0)


def _equal_partitions(heads: list[int], size: int) -> Iterator[list[list[int]]]:
    if not heads:
        yield []
        return
    first, rest = heads[0], heads[1:]
    from itertools import combinations

    for mates in combinations(rest, size - 1):
        group = [first, *mates]
        left = [h for h in rest if h not in mates]
        for others in _equal_partitions(left, size):
            yield [group, *others]


def _local_search(
    groups: list[list[int]], objective: PoolingObjective, equal: bool
) -> list[list[int]]:
    """Steepest descent over single-head moves (uneven only) and pairwise swaps."""
    groups = [list(g) for g in groups]
    costs = [objective.cost(g) for g in groups]
    while True:
        best_delta, best = -1e-12, None
        for a in range(len(groups)):
            for b in range(len(groups)):
                if a == b:
                    continue
                if not equal and len(groups[a]) > 1:
                    for h in groups[a]:
                        na = [x for x in groups[a] if x != h]
                        nb = [*groups[b], h]
                        delta = objective.cost(na) + objective.cost(nb) - costs[a] - costs[b]
                        if delta < best_delta:
                            best_delta, best = delta, (a, b, na, nb)
                if a < b:
                    for h in groups[a]:
                        for h2 in groups[b]:
                            na = [h2 if x == h else x for x in groups[a]]
                            nb = [h if x == h2 else x for x in groups[b]]
                            delta = (objective.cost(na) + objective.cost(nb)
                                     - costs[a] - costs[b])
                            if delta < best_delta:
                                best_delta, best = delta, (a, b, na, nb)
        if best is None:
            return groups
        a, b, na, nb = best
        groups[a], groups[b] = na, nb
        costs[a], costs[b] = objective.cost(na), objective.cost(nb)


def _agglomerative(objective: PoolingObjective, num_groups: int) -> list[list[int]]:
    groups = [[h] for h in range(objective.num_heads)]
    while len(groups) > num_groups:
        _, a, b = min(
            (objective.cost(groups[a] + groups[b]) - objective.cost(groups[a])
             - objective.cost(groups[b]), a, b)
            for a in range(len(groups)) for b in range(a + 1, len(groups))
        )
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return groups


def _random_start(num_heads: int, num_groups: int, equal: bool,
                  rng: random.Random) -> list[list[int]]:
    heads = list(range(num_heads))
    rng.shuffle(heads)
    if equal:
        size = num_heads // num_groups
        return [heads[g * size:(g + 1) * size] for g in range(num_groups)]
    groups = [[h] for h in heads[:num_groups]]
    for h in heads[num_groups:]:
        groups[rng.randrange(num_groups)].append(h)
    return groups


def canonical(groups: Iterable[Iterable[int]]) -> list[list[int]]:
    """Members ascending; groups biggest first, ties by their first head."""
    return sorted((sorted(g) for g in groups), key=lambda g: (-len(g), g[0]))


def contiguous_groups(num_heads: int, num_groups: int) -> list[list[int]]:
    """The paper's grouping: contiguous runs of :func:`kdgqa.even_counts` sizes."""
    out, start = [], 0
    for count in even_counts(num_heads, num_groups):
        out.append(list(range(start, start + count)))
        start += count
    return out


def search_partition(
    terms: np.ndarray | PoolingObjective,
    num_groups: int,
    *,
    equal: bool = False,
    exhaustive_limit: int = EXHAUSTIVE_LIMIT,
    restarts: int = RESTARTS,
    seed: int = SEED,
) -> list[list[int]]:
    """The partition of the heads into ``num_groups`` groups with the least pooling loss.

    Exact when :func:`count_partitions` is at most ``exhaustive_limit``; otherwise the best
    local optimum from an agglomerative (uneven) or contiguous (equal) start and
    ``restarts`` seeded random starts. Deterministic. Returned in :func:`canonical` order.
    """
    objective = terms if isinstance(terms, PoolingObjective) else PoolingObjective(terms)
    heads = objective.num_heads
    if not 1 <= num_groups <= heads:
        raise SchemeError(f"num_groups must be in [1, {heads}], got {num_groups}")
    if equal and heads % num_groups:
        raise SchemeError(f"equal groups need num_heads={heads} divisible by {num_groups}")
    if count_partitions(heads, num_groups, equal) <= exhaustive_limit:
        candidates: Iterable[list[list[int]]] = (
            _equal_partitions(list(range(heads)), heads // num_groups) if equal
            else _partitions(heads, num_groups)
        )
        best = min(candidates, key=objective.total)
        return canonical(best)
    rng = random.Random(seed)
    starts = [contiguous_groups(heads, num_groups) if equal
              else _agglomerative(objective, num_groups)]
    starts += [_random_start(heads, num_groups, equal, rng) for _ in range(restarts)]
    found = [_local_search(start, objective, equal) for start in starts]
    return canonical(min(found, key=objective.total))
