"""PGQA's output perturbation as one fused op with a closed-form backward.

For every (sample, head) row ``x`` of the attention output ``(B, H, N, D)``, flattened over
``n = N * D`` elements, PGQA returns ``y = x - (m + u * s)`` where ``m`` is the row mean,
``s`` its *unbiased* standard deviation (``torch.std_mean``'s default, correction 1) and ``u``
the head's standardised noise row (no gradient).

Written as tensor ops, autograd saves the statistics' intermediates and its backward runs a
handful of full-size passes; on an H200 that was ~16 % of a ViT-B training step. The backward
has a closed form. With ``g = dL/dy``, ``dy_j/dx_i = [i == j] - dm/dx_i - u_j ds/dx_i``,
``dm/dx_i = 1/n`` and ``ds/dx_i = (x_i - m) / ((n - 1) s)`` (in ``d/dx_i sum_j (x_j - m)^2``
the terms through ``m`` cancel because ``sum_j (x_j - m) = 0``), so::

    dL/dx = g - mean(g) - sum(g * u) * (x - m) / ((n - 1) * s)

and where ``s == 0`` the last term is dropped, as ``torch.std``'s backward does. Only ``x``
(which SDPA keeps for its own backward anyway), the noise and two fp32 numbers per row are
saved. Statistics are accumulated in fp32 (fp64 for fp64 inputs) and the output is rounded
once to the input dtype.

Implementations (``method``):

- ``"triton"``: two Triton kernels, one program per row; forward computes the mean, then the
  variance about it (a second pass over the row, mostly from L2), then writes ``y``; backward
  sums ``g`` and ``g * u``, then writes ``dL/dx``. Any strides: SDPA's output is usually a
  transposed view of ``(B, N, H, D)`` memory, and ``y`` and ``dL/dx`` keep that layout, so no
  copy is made on either side.
- ``"function"``: the same forward and backward in tensor ops (CPU and fallback path).
- ``"autograd"``: the plain expression left to autograd (what ``torch.compile`` sees: inductor
  fuses it into the neighbouring kernels, so it is the right thing to trace).
- ``"auto"``: ``triton`` on CUDA (fp16/bf16/fp32) when Triton is importable, ``function``
  otherwise. Measured on an H200 (bf16, ViT-B attention module, B 256, fwd+bwd): triton
  2.75 ms, the old autograd expression 3.66, ``function`` 3.91 (gqa 2.33-2.38), so the tensor-op
  Function is only the CPU path, where it beats autograd.

Under ``torch.compile`` / ``torch.export`` every method traces the plain expression: the
graph then holds ordinary ops that inductor fuses, and no hand-written kernel has to be
traced.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdgqa.errors import KdgqaError

__all__ = ["PERTURB_METHODS", "perturb_rows", "perturb_triton_available"]

PERTURB_METHODS = ("auto", "triton", "function", "autograd")

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Elements per tile a program loads at a time (tokens x padded head_dim).
_TILE = 1024


def perturb_triton_available() -> bool:
    """Whether the Triton kernels can be used (Triton importable)."""
    return _HAS_TRITON


if _HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _perturb_fwd_kernel(
        x_ptr, unit_ptr, y_ptr, mean_ptr, std_ptr,
        heads, tokens,
        sxb, sxh, sxt, sxd, syb, syh, syt, syd,
        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // heads
        h = row % heads
        n = tokens * HEAD_DIM
        x_row = x_ptr + b * sxb + h * sxh
        y_row = y_ptr + b * syb + h * syh
        u_row = unit_ptr + h * n
        t = tl.arange(0, BLOCK_T).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, tokens, BLOCK_T):
            tt = t0 + t
            ok = (tt < tokens)[:, None] & d_ok[None, :]
            xv = tl.load(x_row + tt[:, None] * sxt + d[None, :] * sxd, mask=ok, other=0.0)
            acc += xv.to(tl.float32)
        mean = tl.sum(acc) / n
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, tokens, BLOCK_T):
            tt = t0 + t
            ok = (tt < tokens)[:, None] & d_ok[None, :]
            xv = tl.load(x_row + tt[:, None] * sxt + d[None, :] * sxd, mask=ok, other=0.0)
            diff = tl.where(ok, xv.to(tl.float32) - mean, 0.0)
            acc += diff * diff
        std = tl.sqrt(tl.sum(acc) / (n - 1))
        tl.store(mean_ptr + row, mean)
        tl.store(std_ptr + row, std)
        for t0 in range(0, tokens, BLOCK_T):
            tt = t0 + t
            ok = (tt < tokens)[:, None] & d_ok[None, :]
            xv = tl.load(x_row + tt[:, None] * sxt + d[None, :] * sxd, mask=ok, other=0.0)
            uv = tl.load(u_row + tt[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
            yv = xv.to(tl.float32) - (mean + uv * std)
            tl.store(y_row + tt[:, None] * syt + d[None, :] * syd,
                     yv.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _perturb_bwd_kernel(
        g_ptr, x_ptr, unit_ptr, mean_ptr, std_ptr, dx_ptr,
        heads, tokens,
        sgb, sgh, sgt, sgd, sxb, sxh, sxt, sxd, sdb, sdh, sdt, sdd,
        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // heads
        h = row % heads
        n = tokens * HEAD_DIM
        g_row = g_ptr + b * sgb + h * sgh
        x_row = x_ptr + b * sxb + h * sxh
        dx_row = dx_ptr + b * sdb + h * sdh
        u_row = unit_ptr + h * n
        t = tl.arange(0, BLOCK_T).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        sum_g = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        sum_gu = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, tokens, BLOCK_T):
            tt = t0 + t
            ok = (tt < tokens)[:, None] & d_ok[None, :]
            gv = tl.load(g_row + tt[:, None] * sgt + d[None, :] * sgd, mask=ok, other=0.0)
            uv = tl.load(u_row + tt[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
            gv = gv.to(tl.float32)
            sum_g += gv
            sum_gu += gv * uv
        mean = tl.load(mean_ptr + row)
        std = tl.load(std_ptr + row)
        g_mean = tl.sum(sum_g) / n
        # Where std == 0 torch.std's backward is zero: drop the term (no 0/0).
        scale = tl.where(std == 0.0, 0.0, tl.sum(sum_gu) / ((n - 1) * std))
        for t0 in range(0, tokens, BLOCK_T):
            tt = t0 + t
            ok = (tt < tokens)[:, None] & d_ok[None, :]
            gv = tl.load(g_row + tt[:, None] * sgt + d[None, :] * sgd, mask=ok, other=0.0)
            xv = tl.load(x_row + tt[:, None] * sxt + d[None, :] * sxd, mask=ok, other=0.0)
            dx = gv.to(tl.float32) - g_mean - scale * (xv.to(tl.float32) - mean)
            tl.store(dx_row + tt[:, None] * sdt + d[None, :] * sdd,
                     dx.to(dx_ptr.dtype.element_ty), mask=ok)

    def _blocks(tokens: int, dim: int) -> tuple[int, int]:
        block_d = triton.next_power_of_2(dim)
        block_t = min(triton.next_power_of_2(tokens), max(1, _TILE // block_d))
        return block_t, block_d

    def _on_device(x: Tensor) -> Any:
        """Launch on ``x``'s GPU whatever the current device is (CPU: the interpreter)."""
        return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

    def _triton_forward(x: Tensor, unit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, heads, tokens, dim = x.shape
        y = torch.empty_like(x)  # keeps x's layout when it is dense (SDPA's transposed output)
        mean = torch.empty((batch, heads, 1, 1), device=x.device, dtype=torch.float32)
        std = torch.empty_like(mean)
        block_t, block_d = _blocks(tokens, dim)
        with _on_device(x):
            _perturb_fwd_kernel[(batch * heads,)](
                x, unit, y, mean, std, heads, tokens, *x.stride(), *y.stride(),
                HEAD_DIM=dim, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
            )
        return y, mean, std

    def _triton_backward(
        grad: Tensor, x: Tensor, unit: Tensor, mean: Tensor, std: Tensor
    ) -> Tensor:
        batch, heads, tokens, dim = x.shape
        dx = torch.empty_like(x)  # x's layout is what SDPA's backward wants back
        block_t, block_d = _blocks(tokens, dim)
        with _on_device(x):
            _perturb_bwd_kernel[(batch * heads,)](
                grad, x, unit, mean, std, dx, heads, tokens,
                *grad.stride(), *x.stride(), *dx.stride(),
                HEAD_DIM=dim, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
            )
        return dx


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _torch_forward(x: Tensor, unit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _, heads, tokens, dim = x.shape
    xf = x.to(_acc_dtype(x.dtype))
    std, mean = torch.std_mean(xf, dim=(2, 3), keepdim=True)
    y = xf - torch.addcmul(mean, unit.reshape(heads, tokens, dim).to(xf.dtype), std)
    return y.to(x.dtype), mean, std


def _torch_backward(grad: Tensor, x: Tensor, unit: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    _, heads, tokens, dim = x.shape
    n = tokens * dim
    g = grad.to(mean.dtype)
    g_mean = g.mean(dim=(2, 3), keepdim=True)
    g_unit = (g * unit.reshape(heads, tokens, dim).to(mean.dtype)).sum(dim=(2, 3), keepdim=True)
    scale = (g_unit / ((n - 1) * std)).masked_fill_(std == 0, 0.0)
    return (g - g_mean - scale * (x.to(mean.dtype) - mean)).to(x.dtype)


class _Perturb(torch.autograd.Function):
    """``x - (mean + unit * std)`` per (b, h) row, with the closed-form backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, unit: Tensor, use_triton: bool) -> Tensor:
        if use_triton:
            y, mean, std = _triton_forward(x, unit)
        else:
            y, mean, std = _torch_forward(x, unit)
        ctx.save_for_backward(x, unit, mean, std)
        ctx.use_triton = use_triton
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        x, unit, mean, std = ctx.saved_tensors
        if ctx.use_triton:
            return _triton_backward(grad, x, unit, mean, std), None, None
        return _torch_backward(grad, x, unit, mean, std), None, None


def _plain(x: Tensor, unit: Tensor) -> Tensor:
    _, heads, tokens, dim = x.shape
    # Statistics over (tokens, head_dim) without reshaping, so no layout copy is made.
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    return x - torch.addcmul(mean, unit.reshape(heads, tokens, dim).to(x.dtype), std)


def perturb_rows(x: Tensor, unit: Tensor, method: str = "auto") -> Tensor:
    """``x - (mean + unit * std)`` for every (b, h) row of ``x`` ``(B, H, N, D)``.

    ``mean`` and ``std`` are the row's mean and unbiased standard deviation over
    ``(N, D)``; ``unit`` ``(H, N * D)`` is the noise row of each head (treated as a
    constant). ``method`` is one of :data:`PERTURB_METHODS` (see the module docstring);
    all compute the same function and gradient; while compiling, all are ``"autograd"``.
    """
    if x.dim() != 4:
        raise KdgqaError(f"expected x of shape (B, H, N, D), got {tuple(x.shape)}")
    _, heads, tokens, dim = x.shape
    if unit.shape != (heads, tokens * dim):
        raise KdgqaError(f"unit must be {(heads, tokens * dim)}, got {tuple(unit.shape)}")
    if method not in PERTURB_METHODS:
        raise KdgqaError(
            f"unknown perturb method {method!r}; valid: {', '.join(PERTURB_METHODS)}"
        )
    if method == "autograd" or x.numel() == 0 or torch.compiler.is_compiling():
        return _plain(x, unit)
    if method == "auto":
        use_triton = x.is_cuda and _HAS_TRITON and x.dtype in _TRITON_DTYPES
        method = "triton" if use_triton else "function"
    if method == "triton":
        if not _HAS_TRITON:
            raise RuntimeError("perturb method 'triton' needs triton installed")
        unit = unit.to(device=x.device, dtype=torch.float32).contiguous()
        return _Perturb.apply(x, unit, True)
    return _Perturb.apply(x, unit, False)
