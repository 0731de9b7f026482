"""The attention op: every K/V expansion method and the native path agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdgqa.ops import expand_kv, grouped_attention, native_gqa_is_fused


@pytest.mark.parametrize("method", ["auto", "gather", "index_select", "advanced_index"])
def test_expansion_methods_agree(method):
    kv = torch.randn(2, 5, 6, 4)  # B, N, 2G (G = 3), D
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    out = expand_kv(kv, index, method)
    assert out.shape == (2, 5, 12, 4)
    torch.testing.assert_close(out[:, :, :6], kv[:, :, index])
    torch.testing.assert_close(out[:, :, 6:], kv[:, :, 3 + index])


def test_per_input_maps_expand_each_input_by_its_own_map():
    kv = torch.randn(2, 5, 4, 3)
    index = torch.tensor([[0, 0, 1], [1, 1, 1]])
    out = expand_kv(kv, index)
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
