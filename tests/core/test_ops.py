"""The attention op: every K/V expansion method and the native path agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdgqa.core.ops import expand_kv, grouped_attention, native_gqa_is_fused


@pytest.mark.parametrize("method", ["auto", "gather", "index_select", "advanced_index", "onehot"])
def test_expansion_methods_agree(method):
    kv = torch.randn(2, 5, 6, 4)  # B, N, 2G (G = 3), D
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    out = expand_kv(kv, index, method)
    assert out.shape == (2, 5, 12, 4)
    torch.testing.assert_close(out[:, :, :6], kv[:, :, index])
    torch.testing.assert_close(out[:, :, 6:], kv[:, :, 3 + index])


@pytest.mark.parametrize("method", ["auto", "onehot"])
def test_per_input_maps_expand_each_input_by_its_own_map(method):
    kv = torch.randn(2, 5, 4, 3)
    index = torch.tensor([[0, 0, 1], [1, 1, 1]])
    out = expand_kv(kv, index, method)
    for b in range(2):
        torch.testing.assert_close(out[b, :, :3], kv[b, :, index[b]])
    with pytest.raises(ValueError, match="only a \\(H,\\) map"):
        expand_kv(kv, index, "index_select")
    with pytest.raises(ValueError, match="unknown expand method 'nope'"):
        expand_kv(kv, index[0], "nope")


def test_uniform_path_equals_the_expanded_path():
    q = torch.randn(2, 6, 5, 4)
    kv = torch.randn(2, 5, 4, 4)
    index = torch.arange(6) // 3
    uniform = grouped_attention(q, kv, index, uniform=True)
    expanded = grouped_attention(q, kv, index, uniform=False)
    torch.testing.assert_close(uniform, expanded)
    k, v = kv[:, :, :2].transpose(1, 2), kv[:, :, 2:].transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(uniform, ref)


def test_native_gqa_is_only_claimed_where_fused():
    assert not native_gqa_is_fused(torch.randn(1, 2, 3, 4), None)
    assert not native_gqa_is_fused(torch.randn(1, 2, 3, 4, dtype=torch.bfloat16), None)


def _grad_fn_names(tensor):
    names, stack = set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("per_input", [False, True])
def test_onehot_expansion_is_exact_and_has_the_gathers_gradient(per_input):
    torch.manual_seed(0)
    kv = torch.randn(2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 0, 0, 1, 2, 2], [2, 2, 2, 2, 0, 1]]) if per_input else \
        torch.tensor([0, 0, 0, 1, 2, 2])
    grad = torch.randn(2, 5, 12, 4, dtype=torch.float64)
    outs, grads = {}, {}
    for method in ("gather", "onehot"):
        outs[method] = expand_kv(kv, index, method)
        (grads[method],) = torch.autograd.grad(outs[method], kv, grad)
    assert torch.equal(outs["onehot"], outs["gather"])  # one non-zero term per output
    torch.testing.assert_close(grads["onehot"], grads["gather"], rtol=1e-12, atol=1e-12)


def test_auto_expands_by_matmul_when_determinism_is_requested():
    kv = torch.randn(1, 3, 4, 2, requires_grad=True)
    index = torch.tensor([0, 0, 0, 1])
    assert any("Gather" in name for name in _grad_fn_names(expand_kv(kv, index)))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        names = _grad_fn_names(expand_kv(kv, index))
    finally:
        torch.use_deterministic_algorithms(was)
    assert not any("Gather" in name for name in names), names


def test_a_key_driven_module_trains_alike_in_deterministic_mode():
    from kdgqa import GroupedQueryAttention

    def step():
        torch.manual_seed(0)
        module = GroupedQueryAttention(48, 6, 2, "kdgqa")
        x = torch.randn(3, 7, 48, requires_grad=True)
        out = module(x)
        out.square().mean().backward()
        return [out, x.grad, *(p.grad for p in module.parameters())]

    default = step()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = step()
    finally:
        torch.use_deterministic_algorithms(was)
    for got, want in zip(deterministic, default, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("per_input", [False, True])
def test_headmap_option_leaves_cpu_on_the_expansion_path(per_input):
    """``expand_method="headmap"`` only changes CUDA: on CPU it is ``auto``, bit for bit."""
    q = torch.randn(2, 6, 5, 8)
    kv = torch.randn(2, 5, 6, 8)
    index = torch.randint(0, 3, (2, 6) if per_input else (6,))
    auto = grouped_attention(q, kv, index, uniform=False)
    assert torch.equal(grouped_attention(q, kv, index, uniform=False, expand_method="headmap"),
                       auto)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per_input", [False, True])
def test_headmap_option_on_cuda_equals_the_expansion_path(per_input):
    qkv = torch.randn(4, 197, 12 + 2 * 5, 64, device="cuda", dtype=torch.bfloat16,
                      requires_grad=True)
    q, kv = qkv.split([12, 10], dim=2)
    index = torch.randint(0, 5, (4, 12) if per_input else (12,), device="cuda")
    grad = torch.randn(4, 12, 197, 64, device="cuda", dtype=torch.bfloat16)
    outs, grads = [], []
    for method in ("auto", "gather"):  # auto: the head-map kernel (bf16, CUDA, no mask)
        out = grouped_attention(q.transpose(1, 2), kv, index, uniform=False,
                                expand_method=method)
        outs.append(out.float())
        grads.append(torch.autograd.grad(out, qkv, grad)[0].float())
    # bf16 results (8 mantissa bits) of different but fp32-accumulated summation orders
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=5e-2)
