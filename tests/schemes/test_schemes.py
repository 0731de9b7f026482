"""Scheme behaviour over time: DGQA state, evaluation purity, reference fidelity, PGQA noise."""

from __future__ import annotations

import pytest
import torch

from kdgqa import GroupedQueryAttention, available_schemes, build_allocator, start_epoch
from kdgqa.core.apportion import reference_dgqa_counts
from kdgqa.schemes import set_stats_reducer
from kdgqa.schemes.key_driven import DGQAAllocator

HEADS, KV = 6, 3


def keys(seed: int, batch: int = 2) -> torch.Tensor:
    """Keys (B, G, N, D) whose head norms differ and drift with the seed."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(KV, generator=gen) * 3 + 0.1
    return torch.randn(batch, KV, 4, 8, generator=gen) * scale[None, :, None, None]


def test_registry_lists_every_scheme():
    assert available_schemes() == [
        "mha", "mqa", "gqa", "pgqa", "kdgqa", "dgqa-ema", "dgqa-diff", "kdgqa-ps",
        "calibrated", "similarity",
    ]


@pytest.mark.parametrize("scheme", ["dgqa-ema", "dgqa-diff"])
def test_dgqa_splits_evenly_until_its_first_window_then_every_window(scheme):
    alloc = build_allocator(scheme, 7, KV, window_size=3).eval()
    assert torch.bincount(alloc(keys(0)), minlength=KV).tolist() == [3, 2, 2]  # eval: even
    alloc.train()
    maps = [alloc(keys(s)).clone() for s in range(7)]
    assert int(alloc.step) == 7 and int(alloc.updates) == 3  # windows at steps 0, 3, 6
    assert torch.equal(maps[0], maps[1]) and torch.equal(maps[1], maps[2])
    assert torch.equal(maps[3], maps[4]) and torch.equal(maps[4], maps[5])


@pytest.mark.parametrize("scheme", ["dgqa-ema", "dgqa-diff"])
def test_dgqa_evaluation_changes_no_state(scheme):
    alloc = build_allocator(scheme, HEADS, KV, window_size=1).train()
    for s in range(3):
        alloc(keys(s))
    before = {k: v.clone() for k, v in alloc.state_dict().items()}
    frozen = alloc.eval()(keys(10)).clone()
    for s in range(11, 14):
        assert torch.equal(alloc(keys(s)), frozen)
    after = alloc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("scheme", ["dgqa-ema", "dgqa-diff"])
def test_dgqa_state_survives_a_state_dict_round_trip(scheme):
    source = GroupedQueryAttention(48, HEADS, KV, scheme, window_size=2).train()
    for s in range(5):
        source(torch.randn(2, 4, 48, generator=torch.Generator().manual_seed(s)))
    state = source.state_dict()
    assert {"allocator.step", "allocator.cache", "allocator.updates", "allocator.counts"} <= set(state)
    restored = GroupedQueryAttention(48, HEADS, KV, scheme, window_size=2).train()
    restored.load_state_dict(state)
    for s in range(5, 9):  # both continue identically, windows included
        x = torch.randn(2, 4, 48, generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(restored(x), source(x), atol=0, rtol=0)
        assert torch.equal(restored.last_kv_index, source.last_kv_index)
    assert int(restored.allocator.step) == 9


@pytest.mark.parametrize("scheme", ["dgqa-ema", "dgqa-diff"])
def test_dgqa_compiled_window_clock_matches_eager(scheme):
    torch._dynamo.reset()
    eager = build_allocator(scheme, HEADS, KV, window_size=3).train()
    traced = build_allocator(scheme, HEADS, KV, window_size=3).train()
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    for s in range(8):
        assert torch.equal(eager(keys(s)), compiled(keys(s)).clone())
    for name in ("step", "updates", "counts", "cache"):
        assert torch.equal(getattr(eager, name), getattr(traced, name)), name
    assert torch.equal(eager(keys(8)), traced(keys(8)))  # eager after compiled resyncs clock


def official_dgqa_module(flavour: str, window: int, steps: list[torch.Tensor], eval_keys):
    """The official DGQA module's bookkeeping (global step reset per epoch), transcribed."""
    cache = torch.zeros(KV)
    history = []
    for step, k in enumerate(steps):
        norms = torch.norm(k, dim=(2, 3)).sum(dim=0)
        if step % window == 0:
            scores = 0.9 * norms + 0.1 * cache if flavour == "ema" else abs(cache - norms)
            history.append(reference_dgqa_counts(scores, HEADS))
            cache = (cache + norms) / window
    norms = torch.norm(eval_keys, dim=(2, 3)).sum(dim=0)
    scores = 0.9 * norms + 0.1 * cache if flavour == "ema" else abs(cache - norms)
    history.append(reference_dgqa_counts(scores, HEADS))
    return history, norms


@pytest.mark.parametrize("flavour", ["ema", "diff"])
def test_reference_dgqa_reproduces_the_official_bookkeeping(flavour):
    steps = [keys(s) for s in range(5)]
    torch.manual_seed(0)
    expected, eval_norms = official_dgqa_module(flavour, 2, steps, keys(99))
    torch.manual_seed(0)
    alloc = build_allocator(f"dgqa-{flavour}", HEADS, KV, window_size=2, reference=True).train()
    got = []
    for s, k in enumerate(steps):
        alloc(k)
        if s % 2 == 0:
            got.append(alloc.counts.tolist())
    alloc.eval()(keys(99))
    got.append(alloc.counts.tolist())
    assert got == expected
    torch.testing.assert_close(alloc.cache, eval_norms)  # evaluation overwrote the cache


def test_reference_dgqa_step_restarts_each_epoch():
    alloc = build_allocator("dgqa-ema", HEADS, KV, window_size=300, reference=True).train()
    for s in range(3):
        alloc(keys(s))
    model = torch.nn.Sequential(alloc)
    start_epoch(model)
    assert int(alloc.step) == 0
    sound = build_allocator("dgqa-ema", HEADS, KV).train()
    sound(keys(0))
    start_epoch(torch.nn.Sequential(sound))
    assert int(sound.step) == 1  # the sound clock is global across epochs


def test_sound_kdgqa_never_starves_a_kv_head():
    k = keys(0)
    k[:, 0] = 0  # head 0 has zero keys: the official code gives it no queries
    alloc = build_allocator("kdgqa", HEADS, KV)
    counts = torch.bincount(alloc(k), minlength=KV)
    assert counts[0] == 1 and counts.sum() == HEADS
    ref = build_allocator("kdgqa", HEADS, KV, reference=True)
    assert torch.bincount(ref(k), minlength=KV)[0] == 0


def test_pgqa_evaluation_is_deterministic_unless_reference():
    x = torch.randn(2, 5, 48)
    sound = GroupedQueryAttention(48, HEADS, KV, "pgqa").eval()
    plain = GroupedQueryAttention(48, HEADS, KV, "gqa").eval()
    plain.load_state_dict(sound.state_dict())
    assert torch.equal(sound(x), sound(x))
    torch.testing.assert_close(sound(x), plain(x), atol=0, rtol=0)
    reference = GroupedQueryAttention(48, HEADS, KV, "pgqa", reference=True).eval()
    assert not torch.equal(reference(x), reference(x))
    assert not torch.equal(sound.train()(x), sound(x))  # training is noisy


def test_stats_reducer_sees_batch_norms_and_drives_the_allocation():
    module = GroupedQueryAttention(48, HEADS, KV, "kdgqa")
    seen = []

    def reducer(norms: torch.Tensor) -> torch.Tensor:
        seen.append(norms.clone())
        return torch.tensor([100.0, 1.0, 1.0])

    set_stats_reducer(module, reducer)
    module(torch.randn(2, 5, 48))
    assert seen and seen[0].shape == (KV,)
    assert torch.bincount(module.last_kv_index, minlength=KV).tolist() == [4, 1, 1]
    set_stats_reducer(module, None)
    assert isinstance(build_allocator("dgqa-ema", HEADS, KV), DGQAAllocator)


def _keys_with_norm_ratio(ratio: float, batch: int = 2) -> torch.Tensor:
    """Keys (B, G=2, N, D) whose KV head 0 has ``ratio`` times head 1's Frobenius norm."""
    k = torch.ones(batch, 2, 4, 8)
    k[:, 0] *= ratio
    return k


@pytest.mark.parametrize("scheme", ["kdgqa", "kdgqa-ps", "dgqa-ema"])
def test_gain_sharpens_shares_so_a_small_norm_lead_can_move_a_head(scheme):
    k = _keys_with_norm_ratio(1.3)  # 57 % of the norm: below the 62.5 % a move needs at H=6
    options = {"window_size": 1} if scheme.startswith("dgqa") else {}
    plain = build_allocator(scheme, 6, 2, **options).train()
    sharp = build_allocator(scheme, 6, 2, gain=4.0, **options).train()  # 1.3**4 = 2.86 -> 74 %
    def counts(a):
        return torch.bincount(a(k).reshape(-1, 6)[0], minlength=2).tolist()
    assert counts(plain) == [3, 3]
    assert counts(sharp) == [4, 2]
    default = build_allocator(scheme, 6, 2, gain=1.0, **options).train()
    assert counts(default) == counts(build_allocator(scheme, 6, 2, **options).train())


@pytest.mark.parametrize(("options", "message"), [
    ({"gain": 0}, "gain must be a number in"),
    ({"gain": float("inf")}, "gain must be a number in"),
    ({"gain": True}, "gain must be a number in"),
    ({"gain": 2.0, "reference": True}, "gain applies to the sound allocation"),
])
def test_bad_gain_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_allocator("kdgqa", 6, 2, **options)
