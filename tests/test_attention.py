"""GroupedQueryAttention against a naive per-head implementation written here."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdgqa import GroupedQueryAttention, SchemeError, available_schemes
from reference import naive_attention

DIM, HEADS = 48, 6
KEY_DRIVEN = ("kdgqa", "dgqa-ema", "dgqa-diff")


def make(scheme: str, kv_heads: int, **options: object) -> GroupedQueryAttention:
    torch.manual_seed(0)
    module = GroupedQueryAttention(DIM, HEADS, kv_heads, scheme, **options)
    with torch.no_grad():  # spread key norms so key-driven maps are uneven
        rows = module.qkv.weight[HEADS * 8:(HEADS + kv_heads) * 8]
        rows.mul_(torch.linspace(0.2, 3.0, kv_heads).repeat_interleave(8)[:, None])
    return module


CASES = [
    ("mha", HEADS, {}), ("mqa", 1, {}), ("gqa", 3, {}), ("gqa", 2, {}), ("pgqa", 3, {}),
    ("pgqa", 2, {"reference": True}), ("kdgqa", 3, {}), ("kdgqa", 4, {}),
    ("kdgqa", 3, {"reference": True}), ("dgqa-ema", 3, {"window_size": 1}),
    ("dgqa-diff", 4, {"window_size": 1}), ("dgqa-ema", 2, {"reference": True, "window_size": 1}),
    ("dgqa-diff", 3, {"reference": True, "window_size": 1}),
]


#: fp64 tolerance: every output and gradient element is a sum of at most a few hundred
#: products (48-wide projections, 7 keys), so the two computation orders differ by about
#: 100 ulp = 2e-14 relative; 1e-10 leaves a margin of ~5,000x on any machine and thread count.
FP64 = {"atol": 1e-10, "rtol": 1e-10}


@pytest.mark.parametrize(("scheme", "kv_heads", "options"), CASES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_naive_per_head_attention(scheme, kv_heads, options, training):
    # In float64, where exactness is the point: fp32 results of two correct orders of
    # summation differ by amounts that depend on the machine and its thread count.
    module = make(scheme, kv_heads, **options).double().train(training)
    x = torch.randn(3, 7, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                    requires_grad=True)
    weight = torch.randn(3, 7, DIM, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    noisy = scheme == "pgqa" and (training or options.get("reference", False))

    torch.manual_seed(5)
    out = module(x)
    kv_index = module.last_kv_index
    assert kv_index is not None and kv_index.shape == (HEADS,) and kv_index.dtype == torch.long
    grads = torch.autograd.grad((out * weight).sum(), [x, *module.parameters()])
    expected = naive_attention(module, x, kv_index, 5 if noisy else None)
    expected_grads = torch.autograd.grad((expected * weight).sum(), [x, *module.parameters()])

    torch.testing.assert_close(out, expected, **FP64)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **FP64)


def test_key_driven_map_follows_key_norms_and_is_uneven():
    module = make("kdgqa", 3).train()
    module(torch.randn(4, 9, DIM))
    counts = torch.bincount(module.last_kv_index, minlength=3)
    assert counts.tolist() != [2, 2, 2]
    assert counts[2] > counts[0]  # head 2's keys were scaled up most
    assert counts.sum() == HEADS and bool((counts >= 1).all())


@pytest.mark.parametrize("scheme", ["gqa", "kdgqa"])
def test_causal_mask_passes_through(scheme):
    module = make(scheme, 3).eval()
    x = torch.randn(2, 5, DIM)
    out = module(x, is_causal=True)
    torch.testing.assert_close(out, naive_attention(module, x, module.last_kv_index, None, True),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize(("scheme", "kv_heads"), [
    (s, {"mha": HEADS, "mqa": 1}.get(s, 3)) for s in available_schemes()
])
def test_compiles_fullgraph_for_every_scheme(scheme, kv_heads):
    torch._dynamo.reset()
    module = make(scheme, kv_heads).train()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, DIM)
    torch.manual_seed(3)
    got = compiled(x)
    if scheme.startswith("dgqa"):  # the compiled call advanced the window clock: rebuild
        module = make(scheme, kv_heads).train()
    torch.manual_seed(3)
    torch.testing.assert_close(got, module(x), atol=1e-6, rtol=0)


def test_stands_in_for_timm_attention_inside_a_block():
    from timm.models.vision_transformer import Block

    block = Block(DIM, HEADS, qkv_bias=True)
    block.attn = GroupedQueryAttention(DIM, HEADS, 3, "kdgqa")
    assert block(torch.randn(2, 5, DIM)).shape == (2, 5, DIM)


def test_kv_cache_bytes_shrink_with_kv_heads():
    mha = GroupedQueryAttention(DIM, HEADS, HEADS, "mha")
    gqa = GroupedQueryAttention(DIM, HEADS, 2, "gqa")
    assert mha.kv_cache_bytes_per_token() == 2 * HEADS * 8 * 2
    assert gqa.kv_cache_bytes_per_token(torch.float32) == 2 * 2 * 8 * 4


BAD_ARGUMENTS = [
    (dict(dim=50, num_heads=6, num_kv_heads=3), "dim=50 is not divisible by num_heads=6"),
    (dict(dim=48, num_heads=6, num_kv_heads=0), "num_kv_heads must be an integer in [1, num_heads=6]"),
    (dict(dim=48, num_heads=6, num_kv_heads=7), "got 7"),
    (dict(dim=48, num_heads=6, num_kv_heads=3, scheme="mha"), "needs num_kv_heads == num_heads (6)"),
    (dict(dim=48, num_heads=6, num_kv_heads=2, scheme="mqa"), "needs num_kv_heads == 1"),
    (dict(dim=48, num_heads=6, num_kv_heads=4, scheme="gqa"), "valid num_kv_heads: [1, 2, 3, 6]"),
    (dict(dim=48, num_heads=6, num_kv_heads=4, scheme="pgqa"), "valid num_kv_heads: [1, 2, 3, 6]"),
    (dict(dim=48, num_heads=6, num_kv_heads=3, scheme="gqa2"), "unknown scheme 'gqa2'; valid schemes: mha, mqa, gqa"),
    (dict(dim=48, num_heads=6, num_kv_heads=3, scheme="kdgqa", window_size=3),
     "unknown option 'window_size' for scheme 'kdgqa'; valid options: gain, min_queries, reference"),
    (dict(dim=48, num_heads=6, num_kv_heads=3, scheme="dgqa-ema", window_size=0), "window_size must be an integer >= 1, got 0"),
    (dict(dim=48, num_heads=6, num_kv_heads=3, scheme="kdgqa", min_queries=3), "min_queries must be an integer in [0, 2]"),
    (dict(dim=48, num_heads=6, num_kv_heads=1, scheme="kdgqa", reference=True), "undefined for num_kv_heads=1"),
    (dict(dim=48, num_heads=6, num_kv_heads=3, attn_drop=1.5), "attn_drop must be in [0, 1)"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=None) as info:
        GroupedQueryAttention(**kwargs)
    assert message in str(info.value)


def test_uneven_groups_are_accepted_by_key_driven_schemes():
    for scheme, kv_heads in itertools.product(KEY_DRIVEN, (4, 5)):
        module = GroupedQueryAttention(DIM, HEADS, kv_heads, scheme).train()
        module(torch.randn(2, 3, DIM))
        counts = torch.bincount(module.last_kv_index, minlength=kv_heads)
        assert counts.sum() == HEADS and bool((counts >= 1).all())


def test_optional_norms_and_rotary_are_absent_by_default_and_applied_when_given():
    plain = GroupedQueryAttention(48, 6, 2)
    assert set(plain.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    x = torch.randn(2, 5, 48)
    with pytest.raises(SchemeError, match="rope= but has no rotary"):
        plain(x, rope=torch.zeros(5, 16))

    def rotary(t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return t * rope  # any per-token map of (B, heads, N, D): here a scaling

    torch.manual_seed(0)
    extra = GroupedQueryAttention(48, 6, 2, q_norm=torch.nn.LayerNorm(8),
                                  k_norm=torch.nn.LayerNorm(8), rotary=rotary,
                                  out_norm=torch.nn.LayerNorm(48))
    rope = torch.rand(5, 8) + 0.5
    qkv = extra.qkv(x).view(2, 5, 10, 8)
    q = rotary(extra.q_norm(qkv[:, :, :6].transpose(1, 2)), rope)
    k = rotary(extra.k_norm(qkv[:, :, 6:8].transpose(1, 2)), rope).repeat_interleave(3, dim=1)
    v = qkv[:, :, 8:].transpose(1, 2).repeat_interleave(3, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    want = extra.proj(extra.out_norm(out.transpose(1, 2).reshape(2, 5, 48)))
    torch.testing.assert_close(extra(x, rope=rope), want)
