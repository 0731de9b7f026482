"""The fused PGQA perturbation equals the plain autograd expression, values and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from conftest import require_triton_interpreter
from kdgqa import GroupedQueryAttention
from kdgqa.core.perturb import PERTURB_METHODS, perturb_rows

B, H, N, D = 3, 4, 9, 8

# (B, H, N, D) views of differently laid-out storage, built from a leaf of the given shape.
LAYOUTS: dict[str, tuple[tuple[int, ...], Callable[[Tensor], Tensor]]] = {
    "contiguous": ((B, H, N, D), lambda t: t),
    "sdpa": ((B, N, H, D), lambda t: t.transpose(1, 2)),  # what SDPA usually returns
    "sliced": ((B, H, N, 2 * D), lambda t: t[..., 1:D + 1]),  # not dense
    "token_major": ((N, B, H, D), lambda t: t.permute(1, 2, 0, 3)),
    "dim_strided": ((B, H, D, N), lambda t: t.transpose(2, 3)),  # head_dim not unit-stride
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_noise(seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    noise = torch.rand(H, N * D, generator=gen(seed), dtype=dtype)
    std, mean = torch.std_mean(noise, dim=-1, keepdim=True)
    return (noise - mean) / std


def run(method: str, leaf: Tensor, view: Callable[[Tensor], Tensor], unit: Tensor,
        grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    leaf = leaf.detach().clone().requires_grad_(True)
    x = view(leaf)
    y = perturb_rows(x, unit, method)
    (gx,) = torch.autograd.grad(y, leaf, grad)
    return x, y.detach(), gx


def inputs(layout: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    shape, _ = LAYOUTS[layout]
    leaf = (torch.randn(shape, generator=gen(2)) * 1.5 + 0.7).to(dtype)
    grad = torch.randn(B, H, N, D, generator=gen(3)).to(dtype)
    return leaf, grad


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_function_matches_autograd_in_fp32(layout):
    leaf, grad = inputs(layout)
    view = LAYOUTS[layout][1]
    unit = unit_noise()
    _, want_y, want_g = run("autograd", leaf, view, unit, grad)
    x, got_y, got_g = run("function", leaf, view, unit, grad)
    torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_g, want_g, atol=1e-5, rtol=1e-5)
    if layout == "sdpa":  # the (B, N, H*D) reshape that follows stays a view
        assert got_y.stride() == x.stride()


def test_bf16_is_within_bf16_tolerance_and_no_worse_than_the_plain_expression():
    leaf, grad = inputs("sdpa", torch.bfloat16)
    view = LAYOUTS["sdpa"][1]
    unit = unit_noise()
    _, ref_y, ref_g = run("autograd", leaf.double(), view, unit.double(), grad.double())
    _, old_y, old_g = run("autograd", leaf, view, unit, grad)
    _, new_y, new_g = run("function", leaf, view, unit, grad)
    assert new_y.dtype == new_g.dtype == torch.bfloat16
    for got, want in ((new_y, old_y), (new_y, ref_y), (new_g, old_g), (new_g, ref_g)):
        torch.testing.assert_close(got.double(), want.double(), atol=2e-2, rtol=1.6e-2)
    # One rounding at the end instead of bf16 statistics: at least as close to fp64.
    assert (new_y.double() - ref_y).abs().max() <= (old_y.double() - ref_y).abs().max()
    assert (new_g.double() - ref_g).abs().max() <= (old_g.double() - ref_g).abs().max()


@pytest.mark.parametrize("layout", ["contiguous", "sdpa"])
def test_gradcheck_in_fp64(layout):
    shape, view = LAYOUTS[layout]
    shape = tuple(min(s, 5) for s in shape)
    x = torch.randn(shape, generator=gen(4), dtype=torch.float64, requires_grad=True)
    heads, tokens, dim = view(x).shape[1:]
    unit = torch.randn(heads, tokens * dim, generator=gen(5), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: perturb_rows(view(t), unit, "function"), (x,))


def test_rows_with_zero_std_follow_torch_std_backward():
    leaf, grad = inputs("sdpa")
    leaf[:, :, 0] = 0.0  # (b, head 0) rows all zero
    leaf[1, :, 2] = 0.75  # (1, head 2) constant
    view = LAYOUTS["sdpa"][1]
    unit = unit_noise()
    _, want_y, want_g = run("autograd", leaf, view, unit, grad)
    _, got_y, got_g = run("function", leaf, view, unit, grad)
    assert bool(torch.isfinite(got_y).all() and torch.isfinite(got_g).all())
    torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_g, want_g, atol=1e-5, rtol=1e-5)
    # Zero std: the std term drops out and the gradient is g - mean(g).
    g0 = grad[:, 0]
    torch.testing.assert_close(view(got_g)[:, 0], g0 - g0.mean(dim=(1, 2), keepdim=True))


def test_expanded_gradient_and_no_grad():
    leaf, _ = inputs("sdpa")
    unit = unit_noise()
    a = leaf.clone().requires_grad_(True)
    b = leaf.clone().requires_grad_(True)
    perturb_rows(a.transpose(1, 2), unit, "function").sum().backward()  # grad of stride 0
    perturb_rows(b.transpose(1, 2), unit, "autograd").sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        got = perturb_rows(leaf.transpose(1, 2), unit, "function")
    torch.testing.assert_close(got, perturb_rows(leaf.transpose(1, 2), unit, "autograd"))


def test_rejects_bad_arguments():
    x = torch.randn(B, H, N, D)
    with pytest.raises(ValueError, match="unknown perturb method"):
        perturb_rows(x, unit_noise(), "fast")
    with pytest.raises(ValueError, match="unit must be"):
        perturb_rows(x, torch.randn(H, N), "function")
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        perturb_rows(x[0], unit_noise(), "function")


def module_step(method: str, compiled: bool = False) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(0)
    module = GroupedQueryAttention(48, 6, 3, "pgqa").train()
    module.allocator.perturb_method = method
    run_module = torch.compile(module, fullgraph=True, backend="aot_eager") if compiled else module
    x = torch.randn(2, 5, 48, generator=gen(6))
    torch.manual_seed(3)
    out = run_module(x)
    grads = torch.autograd.grad((out * torch.randn(out.shape, generator=gen(7))).sum(),
                                list(module.parameters()))
    return out.detach(), list(grads)


@pytest.mark.parametrize("method", [m for m in PERTURB_METHODS if m not in ("autograd", "triton")])
def test_module_methods_agree(method):
    want_out, want_grads = module_step("autograd")
    got_out, got_grads = module_step(method)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sound_evaluation_returns_the_output_untouched():
    module = GroupedQueryAttention(48, 6, 3, "pgqa").eval()
    out = torch.randn(2, 6, 5, 8)
    assert module.allocator.perturb(out, module.allocator.static_kv_index) is out


def test_compiles_fullgraph_with_the_same_values_and_gradients():
    torch._dynamo.reset()
    want_out, want_grads = module_step("auto")
    got_out, got_grads = module_step("auto", compiled=True)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from kdgqa import GroupedQueryAttention
    from kdgqa.core.perturb import perturb_rows

    gen = torch.Generator().manual_seed(0)
    TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2),
           torch.float16: (2e-3, 1e-3)}
    # (B, H, N, D): several token blocks with a ragged last one; a head_dim not a power of 2.
    # (1, 2, 1, 1): one element per row, where the unbiased std is NaN as in torch.
    for b, h, n, d in ((2, 3, 37, 64), (3, 4, 9, 24), (1, 1, 1, 5), (1, 2, 1, 1)):
        layouts = {
            "contiguous": ((b, h, n, d), lambda t: t),
            "sdpa": ((b, n, h, d), lambda t: t.transpose(1, 2)),
            "sliced": ((b, h, n, d + 3), lambda t: t[..., 2:d + 2]),
            "dim_strided": ((b, h, d, n), lambda t: t.transpose(2, 3)),
        }
        unit = torch.randn(h, n * d, generator=gen)
        for dtype, (atol, rtol) in TOL.items():
            for name, (shape, view) in layouts.items():
                leaf = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
                if n * d > 1:
                    view(leaf)[0, 0] = 0.25  # a row with zero std
                grad = torch.randn(b, h, n, d, generator=gen).to(dtype)
                res = {}
                for method in ("function", "triton"):
                    x = leaf.clone().requires_grad_(True)
                    xv = view(x)
                    y = perturb_rows(xv, unit, method)
                    (gx,) = torch.autograd.grad(y, xv, grad)
                    res[method] = (y.detach(), gx)
                    assert y.dtype == gx.dtype == dtype
                    if method == "triton" and min(b, h, n, d) > 1 and name != "sliced":
                        assert y.stride() == xv.stride(), name  # dense: layout kept
                if n * d == 1:  # unbiased std of one element: NaN in both
                    assert torch.isnan(res["triton"][0]).all()
                    assert torch.isnan(res["function"][0]).all()
                    continue
                for (got, want) in zip(res["triton"], res["function"]):
                    torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                               msg=lambda m: f"{name} {dtype} {b, h, n, d}: {m}")
    # y and dL/dx keep SDPA's transposed layout, so no copy is made on either side.
    x = torch.randn(2, 37, 3, 64, generator=gen).transpose(1, 2).requires_grad_(True)
    y = perturb_rows(x, torch.randn(3, 37 * 64, generator=gen), "triton")
    (gx,) = torch.autograd.grad(y, x, torch.randn(2, 37, 3, 64).transpose(1, 2))
    assert y.stride() == x.stride() and gx.stride() == x.stride()
    # An expanded (stride 0) incoming gradient.
    a = x.detach().clone().requires_grad_(True)
    c = x.detach().clone().requires_grad_(True)
    u = torch.randn(3, 37 * 64, generator=gen)
    perturb_rows(a, u, "triton").sum().backward()
    perturb_rows(c, u, "function").sum().backward()
    torch.testing.assert_close(a.grad, c.grad, atol=1e-5, rtol=1e-5)
    # The whole module, same noise seed.
    outs = []
    for method in ("autograd", "triton"):
        torch.manual_seed(0)
        module = GroupedQueryAttention(48, 6, 3, "pgqa").train()
        module.allocator.perturb_method = method
        inp = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(3)
        out = module(inp)
        grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
        outs.append((out.detach(), grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print("ok")
    """
)


def test_triton_kernels_match_in_the_interpreter():
    require_triton_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


AOT_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kdgqa.core import perturb

    # The runtime specialises unit strides to constexpr 1 and marks 16-divisible pointers and
    # strides; do the same so the code is what an H100/H200 would run (vectorised accesses).
    KERNELS = {
        perturb._perturb_fwd_kernel: (
            ["x", "unit", "y", "mean", "std"], ["heads", "tokens"],
            ["sxb", "sxh", "sxt", "sxd", "syb", "syh", "syt", "syd"]),
        perturb._perturb_bwd_kernel: (
            ["g", "x", "unit", "mean", "std", "dx"], ["heads", "tokens"],
            ["sgb", "sgh", "sgt", "sgd", "sxb", "sxh", "sxt", "sxd", "sdb", "sdh", "sdt", "sdd"]),
    }
    for dtype in ("bf16", "fp16", "fp32"):
        for kernel, (ptrs, ints, strides) in KERNELS.items():
            names = [p + "_ptr" for p in ptrs] + ints + strides
            signature = {n: "i32" for n in names}
            signature.update({p + "_ptr": "*fp32" if p in ("unit", "mean", "std") else f"*{dtype}"
                              for p in ptrs})
            constexprs = {"HEAD_DIM": 64, "BLOCK_T": 16, "BLOCK_D": 64}
            for name in strides:
                if name.endswith("d"):
                    signature[name] = "constexpr"
                    constexprs[name] = 1
            signature.update({k: "constexpr" for k in ("HEAD_DIM", "BLOCK_T", "BLOCK_D")})
            aligned = [p + "_ptr" for p in ptrs] + [s for s in strides if not s.endswith("d")]
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            try:
                src = ASTSource(kernel, signature, constexprs, attrs)
                target = GPUTarget("cuda", 90, 32)
            except (TypeError, ValueError) as err:  # another Triton API: nothing to check
                print("skip", err)
                raise SystemExit(0)
            compiled = triton.compile(src, target=target, options={"num_warps": 4})
            assert "ld.global.v4" in compiled.asm["ptx"], (kernel, dtype)
    print("ok")
    """
)


def test_triton_kernels_compile_for_hopper(tmp_path):
    """The real compiler (not the interpreter) accepts the kernels, down to sm_90 SASS."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("skip"):
        pytest.skip(done.stdout.strip())
    assert done.stdout.strip().endswith("ok")
