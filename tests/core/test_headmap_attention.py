"""kdgqa.core.headmap_attention: the Triton kernels (through Triton's CPU interpreter, in a
subprocess because ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e.
at import), the PyTorch fallback of the same op, torch.compile, and CUDA-only checks.

Tolerances. In fp32 the kernel and the reference differ only in summation order (blocked
online softmax vs one pass; per-block partial sums). Each result is a chain of at most
``T`` rounded products (``T = N + D`` for the output and dQ, ``T = H * N + D`` for dK/dV,
which also sum over the group's query heads); rounding errors of random sign grow like
``sqrt(T) * u`` (u = 2^-24) times the size of the summed terms, which for randn inputs stays
below ~16x the largest result: ``atol = 16 * sqrt(T) * u * max|ref|``. In fp16 the kernel
rounds P (or dS) to fp16 before the second matmul and rounds the result (2 roundings of
u = 2^-11 each); cancellation in dS allows another 2x: ``atol = 4 * u * max|ref|``. bf16 is
not checked in the interpreter: its ``tl.dot`` on bf16 operands returns garbage there
(checked with triton 3.8), so bf16 is covered by the CUDA tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

from conftest import require_triton_interpreter
from kdgqa.core.headmap_attention import (
    TUNED_TILES,
    HeadmapTiles,
    Tiles,
    default_tiles,
    headmap_attention,
    headmap_attention_reference,
)
from kdgqa.errors import KdgqaError

# map: "uniform" (contiguous equal groups), "uneven" (H,), "per_sample" (B, H), "unused"
# (a (B, H) map leaving some KV heads without query heads), "permuted" (G == H).
CASES: dict[str, dict[str, Any]] = {
    "uniform_n13_d32": dict(b=2, h=4, g=2, n=13, d=32, map="uniform"),
    "uneven_n65_d64_blocks16": dict(b=2, h=4, g=2, n=65, d=64, map="uneven", bm=16, bn=16),
    "per_sample_n65_d32_blocks32x16": dict(b=2, h=6, g=3, n=65, d=32, map="per_sample",
                                           bm=32, bn=16, strided=True),
    "mqa_g1_n13_d64": dict(b=1, h=4, g=1, n=13, d=64, map="uniform"),
    "mha_g_eq_h_n13_d32": dict(b=2, h=3, g=3, n=13, d=32, map="permuted"),
    "unused_kv_heads_n13_d32": dict(b=2, h=4, g=3, n=13, d=32, map="unused", bm=16, bn=16),
    "vit_tokens_n197_d64": dict(b=1, h=3, g=2, n=197, d=64, map="uneven"),
    "d128_n13_scale03": dict(b=1, h=4, g=2, n=13, d=128, map="uneven", scale=0.3),
    "d48_not_a_power_of_two": dict(b=1, h=4, g=2, n=13, d=48, map="per_sample"),
    "fp16_per_sample_n65_d64": dict(b=2, h=4, g=2, n=65, d=64, map="per_sample",
                                    dtype="float16"),
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from kdgqa.core.headmap_attention import (
        HeadmapTiles, headmap_attention, headmap_attention_reference)

    def head_map(c, gen):
        b, h, g = c["b"], c["h"], c["g"]
        if c["map"] == "uniform":
            return torch.arange(h) // (h // g)
        if c["map"] == "uneven":
            return torch.tensor([0] * (h - g + 1) + list(range(1, g)))
        if c["map"] == "permuted":
            return torch.randperm(h, generator=gen)
        if c["map"] == "unused":
            return torch.tensor([[0, 0, 0, 0], [1, 1, 0, 1]])
        return torch.randint(0, g, (b, h), generator=gen)

    def run(c, q, k, v, m, grad):
        tiles = HeadmapTiles.same(c["bm"], c["bn"]) if "bm" in c else None
        out = headmap_attention(q, k, v, m, c.get("scale"), tiles=tiles)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    results = {}
    for name, c in json.loads(sys.argv[1]).items():
        gen = torch.Generator().manual_seed(0)
        dtype = getattr(torch, c.get("dtype", "float32"))
        b, h, g, n, d = c["b"], c["h"], c["g"], c["n"], c["d"]
        if c.get("strided"):  # q, k, v: views of one token-major fused projection
            qkv = torch.randn(b, n, h + 2 * g, d, generator=gen).to(dtype).requires_grad_()
            q, k, v = qkv.transpose(1, 2).split([h, g, g], dim=1)
        else:
            q, k, v = (torch.randn(b, x, n, d, generator=gen).to(dtype).requires_grad_()
                       for x in (h, g, g))
        grad = torch.randn(b, h, n, d, generator=gen).to(dtype)
        m = head_map(c, gen)
        got = run(c, q, k, v, m, grad)
        f32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = headmap_attention_reference(*f32, m, c.get("scale"))
        want = (ref, *torch.autograd.grad(ref, f32, grad.float()))
        again = run(c, q, k, v, m, grad)
        results[name] = {
            key: {"err": (x.float() - y).abs().max().item(), "max": y.abs().max().item()}
            for key, x, y in zip(("out", "dq", "dk", "dv"), got, want)
        }
        results[name]["bitwise_repeat"] = all(torch.equal(x, y) for x, y in zip(got, again))
        results[name]["dtypes"] = [str(x.dtype) for x in got]
        results[name]["inner_stride_1"] = all(x.stride(-1) == 1 for x in got)
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    """Every case run once through the Triton interpreter (one subprocess, ~10 s)."""
    require_triton_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tolerance(case: dict[str, Any], key: str, max_ref: float) -> float:
    if case.get("dtype") == "float16":
        return 4 * 2.0**-11 * max_ref
    terms = case["n"] + case["d"] if key in ("out", "dq") else case["h"] * case["n"] + case["d"]
    return 16 * math.sqrt(terms) * 2.0**-24 * max(max_ref, 1.0)


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_the_reference_in_the_interpreter(interpreted, name):
    case, res = CASES[name], interpreted[name]
    dtype = f"torch.{case.get('dtype', 'float32')}"
    assert res["dtypes"] == [dtype] * 4
    for key in ("out", "dq", "dk", "dv"):
        tol = _tolerance(case, key, res[key]["max"])
        assert res[key]["err"] <= tol, f"{key}: max error {res[key]['err']:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_backward_is_bitwise_repeatable(interpreted, name):
    assert interpreted[name]["bitwise_repeat"]


def _inputs(per_sample: bool, dtype: torch.dtype = torch.float32, device: str = "cpu",
            b: int = 2, h: int = 6, g: int = 3, n: int = 13, d: int = 32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, n, d, generator=gen).to(device, dtype).requires_grad_()
               for heads in (h, g, g))
    grad = torch.randn(b, h, n, d, generator=gen).to(device, dtype)
    m = torch.randint(0, g, (b, h) if per_sample else (h,), generator=gen).to(device)
    return q, k, v, m, grad


@pytest.mark.parametrize("per_sample", [False, True])
def test_cpu_fallback_matches_the_reference(per_sample):
    """Without the interpreter the op runs the same math in PyTorch on CPU tensors."""
    q, k, v, m, grad = _inputs(per_sample)
    out = headmap_attention(q, k, v, m, scale=0.2)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    ref = headmap_attention_reference(q, k, v, m, scale=0.2)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), grad))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=16 * math.sqrt(6 * 13 + 32) * 2**-24)
    again = headmap_attention(q, k, v, m, scale=0.2)
    assert all(torch.equal(x, y) for x, y in zip(
        got[1:], torch.autograd.grad(again, (q, k, v), grad), strict=True))


def test_torch_compile_keeps_the_op_in_one_graph():
    q, k, v, m, grad = _inputs(per_sample=True)
    torch._dynamo.reset()
    compiled = torch.compile(headmap_attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, m)
    eager = headmap_attention(q, k, v, m)
    assert torch.equal(out, eager)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(eager, (q, k, v), grad), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(("shapes", "message"), [
    (((2, 4, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8), (3,)), "head_map must be an integer"),
    (((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), (4,)), "do not match q"),
    (((2, 4, 5, 8), (2, 2, 5, 8), (2, 3, 5, 8), (4,)), "wants q"),
])
def test_bad_shapes_raise_one_line(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes[:3])
    with pytest.raises(KdgqaError, match=message):
        headmap_attention(q, k, v, torch.zeros(shapes[3], dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_on_another_device_raises():
    q, k, v, m, _ = _inputs(per_sample=False, device="cuda")
    with pytest.raises(KdgqaError, match="head_map is on cpu"):
        headmap_attention(q, k, v, m.cpu())


@pytest.mark.parametrize(("tiles", "message"), [
    (HeadmapTiles.same(24, 16), "forward.block_m must be a power of two >= 16; got 24"),
    (HeadmapTiles(Tiles(64, 64), Tiles(64, 8), Tiles(64, 64)), "grad_q.block_n must be"),
    (HeadmapTiles(Tiles(64, 64), Tiles(64, 64), Tiles(64, 64, 3)), "grad_kv.num_warps must"),
])
def test_bad_tiles_raise(tiles, message):
    q, k, v, m, _ = _inputs(per_sample=False)
    with pytest.raises(KdgqaError, match=message):
        headmap_attention(q, k, v, m, tiles=tiles)


def test_tuned_tiles_cover_every_head_dim_and_round_trip():
    assert default_tiles(16) == TUNED_TILES[32]
    assert default_tiles(48) == TUNED_TILES[64]
    assert default_tiles(256) == TUNED_TILES[max(TUNED_TILES)]
    for tiles in TUNED_TILES.values():
        tiles.check()
        assert HeadmapTiles.from_flat(tiles.flat()) == tiles


# ---- CUDA only: run by the GPU session (compiled kernels, bf16, long sequences, speed) ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "d"), [(197, 64), (577, 64), (197, 128), (65, 32)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_kernels_match_the_fp32_reference(dtype, n, d, per_sample):
    q, k, v, m, grad = _inputs(per_sample, dtype, "cuda", b=3, h=12, g=5, n=n, d=d)
    out = headmap_attention(q, k, v, m)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    f32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = headmap_attention_reference(*f32, m)
    want = (ref, *torch.autograd.grad(ref, f32, grad.float()))
    for key, x, y in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert x.dtype == dtype
        case = dict(n=n, d=d, h=12, dtype="float16" if dtype != torch.float32 else None)
        tol = _tolerance(case, key, y.abs().max().item())
        if dtype == torch.bfloat16:
            tol *= 8.0  # bf16 keeps 8 mantissa bits to fp16's 11
        err = (x.float() - y).abs().max().item()
        assert err <= tol, f"{key}: max error {err:.3g} > {tol:.3g}"


@cuda
def test_cuda_backward_is_bitwise_repeatable():
    q, k, v, m, grad = _inputs(True, torch.bfloat16, "cuda", b=8, h=12, g=6, n=197, d=64)
    runs = [torch.autograd.grad(headmap_attention(q, k, v, m), (q, k, v), grad)
            for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], other, strict=True))


@cuda
def test_cuda_inductor_compiles_the_kernels():
    q, k, v, m, grad = _inputs(True, torch.bfloat16, "cuda", n=197, d=64)
    torch._dynamo.reset()
    compiled = torch.compile(headmap_attention, fullgraph=True)
    out = compiled(q, k, v, m)
    assert torch.equal(out, headmap_attention(q, k, v, m))
    eager = torch.autograd.grad(headmap_attention(q, k, v, m), (q, k, v), grad)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), grad), eager, strict=True):
        assert torch.equal(x, y)


@cuda
def test_cuda_eager_launch_path_equals_the_custom_op_bitwise():
    # Eager mode launches the kernels directly; torch.compile traces the custom op. Same
    # kernels and tiles: the same bits, forward and backward.
    q, k, v, m, grad = _inputs(True, torch.bfloat16, "cuda", b=4, h=12, g=5, n=197, d=64)
    eager = headmap_attention(q, k, v, m)
    op_out, _ = torch.ops.kdgqa.headmap_attention_fwd(q, k, v, m, 64 ** -0.5,
                                                      default_tiles(64).flat())
    assert torch.equal(eager, op_out)
    for x, y in zip(torch.autograd.grad(eager, (q, k, v), grad),
                    torch.autograd.grad(op_out, (q, k, v), grad), strict=True):
        assert torch.equal(x, y)


@cuda
def test_cuda_inference_mode_runs_the_kernels():
    q, k, v, m, _ = _inputs(False, torch.float16, "cuda", b=2, h=12, g=5, n=197, d=64)
    with torch.inference_mode():
        out = headmap_attention(q, k, v, m)
    assert torch.equal(out, headmap_attention(q, k, v, m).detach())


@cuda
def test_cuda_headmap_training_step_never_synchronises():
    import kdgqa
    from conftest import assert_training_steps_never_synchronise

    module = kdgqa.GroupedQueryAttention(384, 6, 3, "kdgqa").to("cuda", torch.bfloat16)
    module.expand_method = "headmap"
    x = torch.randn(4, 197, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert_training_steps_never_synchronise(module, x)


@cuda
def test_cuda_unchecked_out_of_range_map_stays_inside_the_tensors():
    # check_map=False: the kernels clamp the entry (to G - 1), so the result is attention
    # with that KV head, not a read of foreign memory.
    q, k, v, _, _ = _inputs(False, torch.bfloat16, "cuda", b=2, h=4, g=2, n=16, d=32)
    bad = torch.tensor([0, 1, 7, -3], device="cuda")
    got = headmap_attention(q, k, v, bad, check_map=False)
    want = headmap_attention(q, k, v, bad.clamp(0, 1))
    assert torch.equal(got, want)


@cuda
def test_cuda_out_of_range_map_fails_instead_of_reading_foreign_memory():
    # In a subprocess: a device-side assert leaves the CUDA context unusable for the rest of
    # the process, so it would fail every later CUDA test of the session.
    script = textwrap.dedent("""
        import torch
        from kdgqa.core.headmap_attention import headmap_attention
        q = torch.randn(2, 4, 16, 32, device="cuda", dtype=torch.bfloat16)
        k = v = torch.randn(2, 2, 16, 32, device="cuda", dtype=torch.bfloat16)
        bad = torch.tensor([0, 1, 2, 1], device="cuda")  # 2 is not a KV head of G = 2
        try:
            headmap_attention(q, k, v, bad)
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("raised:", str(exc).splitlines()[0])
        else:
            print("no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert "raised:" in done.stdout, done.stdout + done.stderr[-2000:]
