"""GPU-only checks (skipped without CUDA) of per-sample maps and static uneven groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VIT, assert_training_steps_never_synchronise
from kdgqa import GroupedQueryAttention, convert
from kdgqa.models.timm_vit import create_timm_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
COUNTS = [4, 4, 3, 1]  # 12 heads, 4 KV heads, 3 group sizes -> 3 native-GQA calls


def _calibrated(dim: int = 768) -> GroupedQueryAttention:
    torch.manual_seed(0)
    module = GroupedQueryAttention(dim, 12, len(COUNTS), "calibrated")
    module.allocator.set_groups(COUNTS, [3, 0, 7, 1, 11, 2, 5, 4, 9, 6, 8, 10])
    return module


@pytest.mark.parametrize(("method", "sdpa_calls"), [("split", [True, True, False]),
                                                   ("auto", [])])  # auto: head-map kernel
def test_split_and_headmap_paths_equal_the_expanded_path(monkeypatch, method, sdpa_calls):
    module = _calibrated().cuda().bfloat16().train()
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    module.expand_method = "gather"
    expanded = module(x)
    expected = torch.autograd.grad(expanded, [x, *module.parameters()], grad)
    sdpa = F.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k["enable_gqa"]) or sdpa(*a, **k))
    module.expand_method = method
    split = module(x)
    assert calls == sdpa_calls
    grads = torch.autograd.grad(split, [x, *module.parameters()], grad)
    for got, want in zip([split, *grads], [expanded, *expected], strict=True):
        error = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)
        assert error < 2e-2, float(error)


@pytest.mark.parametrize("scheme", ["calibrated", "kdgqa-ps"])
def test_training_step_never_synchronises(scheme):
    module = (_calibrated() if scheme == "calibrated"
              else GroupedQueryAttention(768, 12, 4, scheme)).cuda().bfloat16().train()
    x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert_training_steps_never_synchronise(module, x)


@pytest.mark.parametrize("scheme", ["calibrated", "kdgqa-ps"])
def test_inductor_compiles_fullgraph(scheme):
    torch._dynamo.reset()
    module = (_calibrated(384) if scheme == "calibrated"
              else GroupedQueryAttention(384, 12, 4, scheme)).cuda().bfloat16().eval()
    x = torch.randn(4, 33, 384, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), atol=2e-2, rtol=2e-2)
    module.train()
    compiled(x).float().sum().backward()


def test_per_sample_maps_on_cuda_equal_the_cpu_maps():
    torch.manual_seed(0)
    module = GroupedQueryAttention(96, 12, 5, "kdgqa-ps").eval()
    x = torch.randn(16, 9, 96) * torch.rand(16, 1, 96) * 4
    module(x)
    cpu_maps = module.last_kv_index.clone()
    module.cuda()(x.cuda())
    assert torch.equal(module.last_kv_index.cpu(), cpu_maps)


def test_calibration_on_cuda_chooses_the_cpu_groups():
    torch.manual_seed(0)
    model = create_timm_vit(**TINY_VIT).eval()
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    on_cpu = convert(copy.deepcopy(model), "calibrated", 3, calibration=images)
    on_gpu = convert(copy.deepcopy(model).cuda(), "calibrated", 3, calibration=images)
    for a, b in zip(on_cpu.blocks, on_gpu.blocks, strict=True):
        assert a.attn.allocator.groups() == b.attn.allocator.groups()
    torch.testing.assert_close(on_gpu(images.cuda()).cpu(), on_cpu(images), atol=1e-4, rtol=1e-4)
