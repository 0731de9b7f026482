"""kdgqa-ps: every input's allocation comes from its own keys, whatever batch it is in."""

from __future__ import annotations

import pytest
import torch

from kdgqa import GroupedQueryAttention, build_allocator, convert, set_stats_reducer
from reference import naive_attention

DIM, HEADS, KV = 48, 6, 3


def make(scheme: str = "kdgqa-ps", kv_heads: int = KV) -> GroupedQueryAttention:
    """Each KV head's keys read their own third of the channels, so an input's channel
    amplitudes decide its key norms (and so its allocation)."""
    torch.manual_seed(0)
    module = GroupedQueryAttention(DIM, HEADS, kv_heads, scheme)
    width = DIM // kv_heads
    with torch.no_grad():
        keys = module.qkv.weight[HEADS * 8:(HEADS + kv_heads) * 8].view(kv_heads, 8, DIM)
        for g in range(kv_heads):
            mask = torch.zeros(DIM)
            mask[g * width:(g + 1) * width] = 1
            keys[g] *= mask
    return module.eval()


def inputs(count: int, seed: int = 0, tokens: int = 7) -> torch.Tensor:
    """Inputs whose channel thirds have different amplitudes per input."""
    gen = torch.Generator().manual_seed(seed)
    amplitude = (torch.rand(count, KV, generator=gen) * 4 + 0.1).repeat_interleave(DIM // KV, 1)
    return torch.randn(count, tokens, DIM, generator=gen) * amplitude[:, None, :]


def test_allocation_and_output_of_an_input_do_not_depend_on_its_batch():
    module = make()
    x = inputs(8)
    others = inputs(5, seed=1)
    with torch.no_grad():
        alone = []
        for i in range(len(x)):
            out = module(x[i:i + 1])
            alone.append((module.last_kv_index[0].clone(), out[0].clone()))
        full = module(x)
        full_maps = module.last_kv_index.clone()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
        shuffled = module(x[perm])
        shuffled_maps = module.last_kv_index.clone()
        mixed = module(torch.cat([others[:3], x, others[3:]]))
        mixed_maps = module.last_kv_index[3:3 + len(x)].clone()
    assert full_maps.shape == (len(x), HEADS)
    assert len({tuple(m.tolist()) for m, _ in alone}) > 2  # inputs really differ
    for i, (kv_index, out) in enumerate(alone):
        position = int((perm == i).nonzero())
        assert torch.equal(full_maps[i], kv_index)
        assert torch.equal(shuffled_maps[position], kv_index)
        assert torch.equal(mixed_maps[i], kv_index)
        torch.testing.assert_close(full[i], out, atol=1e-6, rtol=0)
        torch.testing.assert_close(shuffled[position], out, atol=1e-6, rtol=0)
        torch.testing.assert_close(mixed[3 + i], out, atol=1e-6, rtol=0)


def test_the_papers_batch_allocation_does_depend_on_the_batch():
    """The property above is not vacuous: batch-summed KDGQA breaks it on the same inputs."""
    module = make("kdgqa")
    x = inputs(8)
    with torch.no_grad():
        module(x)
        batch_map = module.last_kv_index.clone()
        maps = []
        for i in range(len(x)):
            module(x[i:i + 1])
            maps.append(module.last_kv_index.clone())
    assert any(not torch.equal(m, batch_map) for m in maps)


@pytest.mark.parametrize("kv_heads", [2, 3, 4])
@pytest.mark.parametrize("training", [True, False])
def test_matches_naive_attention_with_each_inputs_own_map(kv_heads, training):
    module = make(kv_heads=kv_heads).train(training)
    x = inputs(4).requires_grad_(True) if kv_heads == KV else torch.randn(
        4, 7, DIM, requires_grad=True)
    weight = torch.randn(4, 7, DIM, generator=torch.Generator().manual_seed(2))
    out = module(x)
    maps = module.last_kv_index
    assert maps.shape == (4, HEADS) and maps.dtype == torch.long
    expected = torch.cat([naive_attention(module, x[b:b + 1], maps[b], None) for b in range(4)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    grads = torch.autograd.grad((out * weight).sum(), [x, *module.parameters()])
    expected_grads = torch.autograd.grad((expected * weight).sum(), [x, *module.parameters()])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_every_kv_head_keeps_a_query_in_every_input():
    k = torch.randn(3, KV, 5, 8)
    k[1, 0] = 0  # input 1 has no key energy in KV head 0
    kv_index = build_allocator("kdgqa-ps", HEADS, KV)(k)
    counts = torch.stack([torch.bincount(row, minlength=KV) for row in kv_index])
    assert counts[1, 0] == 1 and bool((counts >= 1).all()) and bool((counts.sum(1) == HEADS).all())
    starved = build_allocator("kdgqa-ps", HEADS, KV, min_queries=0)(k)
    assert torch.bincount(starved[1], minlength=KV)[0] == 0


def test_never_reduces_across_the_batch_or_ranks():
    module = make()

    def reducer(norms: torch.Tensor) -> torch.Tensor:
        raise AssertionError("per-sample allocation must not reduce statistics")

    set_stats_reducer(module, reducer)
    with torch.no_grad():
        module(inputs(2))


def test_compiles_fullgraph_with_per_input_maps():
    torch._dynamo.reset()
    module = make().train()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = inputs(4)
    got = compiled(x)
    maps = module.last_kv_index.clone()
    torch.testing.assert_close(got, module(x), atol=1e-6, rtol=0)
    assert torch.equal(maps, module.last_kv_index)


def test_converted_model_is_dynamic_and_refuses_a_fixed_export(tmp_path):
    from conftest import TINY_VIT
    from kdgqa.errors import ExportError
    from kdgqa.io.export import export_mha
    from kdgqa.models.timm_vit import create_timm_vit

    torch.manual_seed(0)
    model = convert(create_timm_vit(**TINY_VIT), "kdgqa-ps", 4).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batch = model(images)
        for i in range(3):
            torch.testing.assert_close(model(images[i:i + 1])[0], batch[i], atol=1e-6, rtol=0)
    with pytest.raises(ExportError, match="'kdgqa-ps' chooses its allocation"):
        export_mha(model, tmp_path / "out")


def test_training_log_records_how_many_inputs_had_each_map():
    from kdgqa.study.train import record_allocation

    module = make()
    x = inputs(16)
    with torch.no_grad():
        module(x)
    maps = module.last_kv_index
    (row,) = record_allocation(torch.nn.Sequential(module), step=7)
    expected = {}
    for m in maps:
        key = tuple(torch.bincount(m, minlength=KV).tolist())
        expected[key] = expected.get(key, 0) + 1 / len(x)
    logged = {tuple(e["counts"]): e["share"] for e in row["input_counts"]}
    assert logged.keys() == expected.keys() and len(logged) > 1
    for key, share in expected.items():
        assert logged[key] == pytest.approx(share)
    shares = [e["share"] for e in row["input_counts"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0)
    assert row["counts"] == torch.bincount(maps[0], minlength=KV).tolist()

    shared = make("kdgqa")  # one map for the whole batch: nothing per input to record
    with torch.no_grad():
        shared(x)
    (row,) = record_allocation(torch.nn.Sequential(shared), step=7)
    assert "input_counts" not in row and sum(row["counts"]) == HEADS
