"""The Triton kernels equal the tensor-op path (run on CPU through Triton's interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import require_triton_interpreter

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from kdgqa.core.apportion import counts_to_kv_index, proportional_counts
    from kdgqa.core.kernels import apportion_triton
    from kdgqa.core.ops import expand_kv

    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        kv = int(torch.randint(1, 9, (), generator=gen))
        heads = kv * int(torch.randint(1, 4, (), generator=gen)) + int(
            torch.randint(0, kv, (), generator=gen))
        min_q = int(torch.randint(0, heads // kv + 1, (), generator=gen))
        scores = torch.rand(3, kv, generator=gen) * 10
        if trial % 5 == 0:
            scores[0, 0] = float("nan")
        if trial % 7 == 0:
            scores[:] = 0
        if trial % 9 == 0:
            scores[1, -1] = float("inf")
        for reduce_rows in (False, True):
            counts, index = apportion_triton(scores, heads, min_q, reduce_rows)
            rows = scores.sum(0, keepdim=True) if reduce_rows else scores
            want = proportional_counts(rows, heads, min_q)
            assert torch.equal(counts, want), (scores, counts, want)
            assert torch.equal(index, counts_to_kv_index(want, heads))

    qkv = torch.randn(2, 5, 6 + 4, 8, requires_grad=True, generator=gen)
    q, kv = qkv.split([6, 4], dim=2)
    for index in (torch.tensor([0, 0, 0, 0, 1, 1]), torch.randint(0, 2, (2, 6), generator=gen)):
        got = expand_kv(kv, index, "triton")
        want = expand_kv(kv, index, "gather")
        assert torch.equal(got, want)
        grad = torch.randn(got.shape, generator=gen)
        (g1,) = torch.autograd.grad(got, qkv, grad)
        (g2,) = torch.autograd.grad(want, qkv, grad)
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)
    print("ok")
    """
)


def test_kernels_match_tensor_ops_in_the_interpreter():
    require_triton_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
