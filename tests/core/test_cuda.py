"""GPU-only checks (skipped without CUDA): Triton paths equal CPU, no host sync, inductor."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_training_steps_never_synchronise
from kdgqa import GroupedQueryAttention, available_schemes
from kdgqa.core.apportion import apportion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
KV = {"mha": 12, "mqa": 1}


def test_fused_allocation_kernel_equals_the_cpu_path():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        scores = torch.rand(4, 1 + trial % 8, generator=gen) * 100
        scores[0, 0] = float("nan") if trial % 3 == 0 else scores[0, 0]
        for reduce_rows in (False, True):
            cpu = apportion(scores, 16, 1, reduce_rows)
            gpu = apportion(scores.cuda(), 16, 1, reduce_rows)
            assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu, strict=True))


@pytest.mark.parametrize("scheme", available_schemes())
def test_cuda_forward_equals_cpu(scheme):
    torch.manual_seed(0)
    module = GroupedQueryAttention(96, 12, KV.get(scheme, 4), scheme).eval()
    x = torch.randn(3, 17, 96)
    want = module(x)
    cpu_map = module.last_kv_index
    got = module.cuda()(x.cuda())
    assert torch.equal(module.last_kv_index.cpu(), cpu_map)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", available_schemes())
def test_training_step_never_synchronises(scheme):
    module = GroupedQueryAttention(768, 12, KV.get(scheme, 6), scheme).cuda().bfloat16().train()
    x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert_training_steps_never_synchronise(module, x)


@pytest.mark.parametrize("scheme", available_schemes())
def test_inductor_compiles_fullgraph(scheme):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = GroupedQueryAttention(256, 8, {"mha": 8, "mqa": 1}.get(scheme, 4), scheme)
    module = module.cuda().eval()
    x = torch.randn(4, 33, 256, device="cuda")
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), atol=1e-4, rtol=1e-4)
    module.train()
    compiled(x).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_perturbation_kernels_equal_the_tensor_op_path(dtype):
    from kdgqa.core.perturb import perturb_rows

    gen = torch.Generator().manual_seed(0)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}
    for b, h, n, d in ((8, 12, 197, 64), (3, 5, 17, 24)):
        for transposed in (False, True):
            shape = (b, n, h, d) if transposed else (b, h, n, d)
            leaf = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
            leaf[0, 0] = 0.25  # a row with zero std
            unit = torch.randn(h, n * d, generator=gen)
            grad = torch.randn(b, h, n, d, generator=gen).to(dtype)
            res = {}
            for method, device in (("function", "cpu"), ("triton", "cuda"), ("autograd", "cuda")):
                x = leaf.to(device).requires_grad_(True)
                xv = x.transpose(1, 2) if transposed else x
                y = perturb_rows(xv, unit.to(device), method)
                (gx,) = torch.autograd.grad(y, xv, grad.to(device))
                if method == "triton":
                    assert y.stride() == xv.stride() and gx.stride() == xv.stride()
                res[method] = (y.float().cpu(), gx.float().cpu())
            for got, want in zip(res["triton"], res["function"], strict=True):
                torch.testing.assert_close(got, want, **tol)
            for got, want in zip(res["triton"], res["autograd"], strict=True):
                torch.testing.assert_close(got, want, atol=5e-2 if dtype != torch.float32 else 1e-4,
                                           rtol=5e-2 if dtype != torch.float32 else 1e-4)


# A fresh process: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts, and determinism is a
# process-wide torch setting.
_TWO_STEPS = """
import torch
from kdgqa import GroupedQueryAttention
torch.use_deterministic_algorithms(True)

def grads():
    torch.manual_seed(0)
    module = GroupedQueryAttention(384, 6, 2, {scheme!r}).cuda()
    x = torch.randn(32, 197, 384, device="cuda", requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        module(x).float().square().mean().backward()
    return [x.grad] + [p.grad for p in module.parameters()]

first, second = grads(), grads()
assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), "grads differ"
"""


@pytest.mark.parametrize("scheme", ["kdgqa", "dgqa-ema", "kdgqa-ps", "gqa"])
def test_deterministic_mode_makes_training_steps_bitwise_reproducible(scheme):
    # Three query heads per KV head: the gather's atomic-add backward would vary run to run.
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = subprocess.run([sys.executable, "-c", _TWO_STEPS.format(scheme=scheme)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
