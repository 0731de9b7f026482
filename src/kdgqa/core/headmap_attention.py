"""Attention that reads each query head's KV head from a map, without expanding K and V.

Uneven or per-sample query->KV maps are otherwise served by expanding K/V to one head per
query head and running multi-head attention: MHA's cost plus the expansion, and a gather
whose backward adds with atomics in a run-dependent order. Here one FlashAttention-2 style
Triton kernel does the forward (online softmax, logsumexp kept for the backward); each
``(sample, query head, query block)`` program loads its KV head from the map. The backward
is two kernels without atomics, so its gradients are bitwise identical run to run:

* dQ: one program per ``(sample, query head, query block)`` looping over key blocks;
* dQ: it also writes ``delta = rowsum(dO * O)`` of its rows, which dK/dV reads;
* dK/dV: one program per ``(sample, KV head, key block)`` that scans the map row and, for
  each query head reading this KV head (ascending head order), loops over query blocks.
  The host never learns the map.

Launch settings are a fixed table per head dim (:data:`TUNED_TILES`), not run-time
autotuning, whose timing-dependent choice would change the summation order between runs.

The op is a ``torch.library`` Triton op with autograd, so ``torch.compile(fullgraph=True)``
keeps it. On tensors Triton cannot run (CPU without the interpreter) the same op computes
:func:`headmap_attention_reference`'s math in PyTorch, so callers need no device check.
No mask and no dropout: callers that need them use ``kdgqa.core.ops.grouped_attention``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdgqa.errors import KdgqaError

__all__ = ["TUNED_TILES", "HeadmapTiles", "Tiles", "default_tiles", "headmap_attention",
           "headmap_attention_reference"]

_HAS_TRITON = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q: Tensor, k: Tensor, v: Tensor, head_map: Tensor) -> None:
    """One-line errors for shapes the kernel cannot serve (values of the map
    are not read here: that would synchronise; :func:`headmap_attention` asserts them on the
    device)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise KdgqaError(f"headmap_attention wants q (B, H, N, D) and k, v (B, G, N, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise KdgqaError(f"headmap_attention: k/v {tuple(k.shape)} do not match q "
                         f"{tuple(q.shape)} in batch, tokens or head dim")
    if head_map.shape not in ((h,), (b, h)) or head_map.dtype.is_floating_point:
        raise KdgqaError(f"headmap_attention: head_map must be an integer ({h},) or ({b}, {h}) "
                         f"tensor; got {head_map.dtype} {tuple(head_map.shape)}")
    if head_map.device != q.device:
        raise KdgqaError(f"headmap_attention: head_map is on {head_map.device}, expected q's "
                         f"device {q.device}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise KdgqaError(f"headmap_attention: q, k, v must share one of float32/float16/"
                         f"bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")


def headmap_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, head_map: Tensor, scale: float | None = None
) -> Tensor:
    """Plain PyTorch: expand K/V by the map, softmax in fp32, cast back. For tests."""
    _check(q, k, v, head_map)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_full, v_full = _expand(k.float(), head_map), _expand(v.float(), head_map)
    scores = torch.matmul(q.float(), k_full.transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(-1), v_full).to(q.dtype)


def _expand(x: Tensor, head_map: Tensor) -> Tensor:
    """``(B, G, N, D) -> (B, H, N, D)`` with ``out[:, h] = x[:, head_map[(b,) h]]``."""
    b, _, n, d = x.shape
    rows = head_map.long() if head_map.dim() == 2 else head_map.long()[None].expand(b, -1)
    return x.gather(1, rows[:, :, None, None].expand(b, rows.shape[1], n, d))


def _reduce(x: Tensor, head_map: Tensor, groups: int) -> Tensor:
    """Sum ``(B, H, N, D)`` into ``(B, G, N, D)`` by the map, as a one-hot matmul: a fixed
    reduction order (deterministic), unlike the gather's scatter-add backward."""
    onehot = F.one_hot(head_map.long(), groups).to(x.dtype)
    spec = "hg" if head_map.dim() == 1 else "bhg"
    return torch.einsum(f"{spec},bhnd->bgnd", onehot, x)


def _reference_forward(
    q: Tensor, k: Tensor, v: Tensor, head_map: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """CPU fallback of the op: ``(out, lse)`` with ``lse`` the natural-log logsumexp."""
    scores = torch.matmul(q.float(), _expand(k.float(), head_map).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), _expand(v.float(), head_map))
    return out.to(q.dtype), lse


def _reference_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    head_map: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """CPU fallback of the op's backward, the same formulas as the kernels."""
    qf, dof = q.float(), grad.float()
    k_full, v_full = _expand(k.float(), head_map), _expand(v.float(), head_map)
    p = torch.exp(torch.matmul(qf, k_full.transpose(-1, -2)) * scale - lse[..., None])
    delta = (dof * out.float()).sum(-1, keepdim=True)
    ds = p * (torch.matmul(dof, v_full.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, k_full) * scale
    dk = _reduce(torch.matmul(ds.transpose(-1, -2), qf) * scale, head_map, k.shape[1])
    dv = _reduce(torch.matmul(p.transpose(-1, -2), dof), head_map, k.shape[1])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _interpreting() -> bool:
    """Triton's CPU interpreter runs the kernels on CPU tensors (tests, no GPU needed)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_kernels(q: Tensor) -> bool:
    return _HAS_TRITON and (q.is_cuda or (_interpreting() and q.device.type == "cpu"))


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch: a tile of ``block_m`` query rows by ``block_n`` key rows, the
    warps of one program and the software-pipeline depth of its loads."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def check(self, name: str) -> None:
        for field, size, least in (("block_m", self.block_m, 16), ("block_n", self.block_n, 16),
                                   ("num_warps", self.num_warps, 1)):
            if size < least or size & (size - 1):
                raise KdgqaError(f"headmap_attention: {name}.{field} must be a power of two "
                                 f">= {least}; got {size}")
        if self.num_stages < 1:
            raise KdgqaError(f"headmap_attention: {name}.num_stages must be >= 1; got "
                             f"{self.num_stages}")


@dataclass(frozen=True)
class HeadmapTiles:
    """Launch settings of the three kernels: forward, dQ and dK/dV. Fixed per head dim (not
    autotuned at run time), so the summation order, and with it every result bit, depends
    only on the inputs and the head dim, never on a timing race."""

    forward: Tiles
    grad_q: Tiles
    grad_kv: Tiles

    @classmethod
    def same(cls, block_m: int, block_n: int) -> HeadmapTiles:
        """One tile shape for all three kernels, default warps and stages (tests)."""
        tiles = Tiles(block_m, block_n)
        return cls(tiles, tiles, tiles)

    def flat(self) -> list[int]:
        return [x for t in (self.forward, self.grad_q, self.grad_kv)
                for x in (t.block_m, t.block_n, t.num_warps, t.num_stages)]

    @classmethod
    def from_flat(cls, values: list[int]) -> HeadmapTiles:
        return cls(*(Tiles(*values[i:i + 4]) for i in (0, 4, 8)))

    def check(self) -> None:
        for name in ("forward", "grad_q", "grad_kv"):
            getattr(self, name).check(name)


#: Chosen on the H200 (bf16, triton 3.6) by ``benchmarks/headmap_tune.py``
#: (``benchmarks/results/headmap_tune_h200.json``), per head dim up to 32, 64 and 128.
TUNED_TILES: dict[int, HeadmapTiles] = {
    32: HeadmapTiles(Tiles(128, 32, 4, 3), Tiles(128, 32, 4, 3), Tiles(32, 64, 4, 1)),
    64: HeadmapTiles(Tiles(128, 64, 8, 3), Tiles(64, 32, 4, 3), Tiles(32, 128, 4, 3)),
    128: HeadmapTiles(Tiles(64, 32, 4, 3), Tiles(64, 32, 4, 4), Tiles(32, 64, 4, 3)),
}


def default_tiles(head_dim: int) -> HeadmapTiles:
    """The tuned launch settings for the smallest tuned head dim ``>= head_dim``."""
    for dim in sorted(TUNED_TILES):
        if head_dim <= dim:
            return TUNED_TILES[dim]
    return TUNED_TILES[max(TUNED_TILES)]


if _HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, map_ptr, o_ptr, lse_ptr,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
        map_b, heads, kv_heads, tokens, head_dim, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program: (query block, sample * query head). qk_scale includes log2(e).
        # Scalars are cast once: inductor passes Python floats as fp64, eager as fp32, and
        # both must give the same bits.
        qk_scale = tl.cast(qk_scale, tl.float32)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        # Clamped: an entry outside [0, G) must never address another tensor's memory.
        g = tl.minimum(tl.maximum(tl.load(map_ptr + b * map_b + h).to(tl.int64), 0),
                       kv_heads - 1)
        b64 = b.to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < tokens
        d_ok = offs_d < head_dim
        q = tl.load(q_ptr + b64 * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b64 * sk_b + g * sk_h
        v_base = v_ptr + b64 * sv_b + g * sv_h
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, tokens, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < tokens
            kt = tl.load(k_base + cols[None, :] * sk_n + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = tl.load(v_base + cols[:, None] * sv_n + offs_d[None, :],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(o_ptr + b64 * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        # Natural-log logsumexp of the scaled scores (as the fallback's), contiguous (B, H, N).
        tl.store(lse_ptr + bh.to(tl.int64) * tokens + offs_m,
                 (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)

    @triton.jit
    def _dq_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, map_ptr, lse_ptr, delta_ptr, dq_ptr,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
        sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, map_b, heads, kv_heads, tokens, head_dim,
        qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program: (query block, sample * query head); loops over key blocks in order.
        # It also writes delta = rowsum(dO * O) of its rows for the dK/dV kernel.
        qk_scale = tl.cast(qk_scale, tl.float32)
        sm_scale = tl.cast(sm_scale, tl.float32)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        g = tl.minimum(tl.maximum(tl.load(map_ptr + b * map_b + h).to(tl.int64), 0),
                       kv_heads - 1)
        b64 = b.to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < tokens
        d_ok = offs_d < head_dim
        qmask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b64 * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                    mask=qmask, other=0.0)
        do = tl.load(do_ptr + b64 * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n
                     + offs_d[None, :], mask=qmask, other=0.0)
        o = tl.load(o_ptr + b64 * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
                    mask=qmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        row = bh.to(tl.int64) * tokens + offs_m
        tl.store(delta_ptr + row, delta, mask=m_ok)
        lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0) * 1.4426950408889634
        k_base = k_ptr + b64 * sk_b + g * sk_h
        v_base = v_ptr + b64 * sv_b + g * sv_h
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, tokens, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < tokens
            kmask = n_ok[:, None] & d_ok[None, :]
            kb = tl.load(k_base + cols[:, None] * sk_n + offs_d[None, :], mask=kmask, other=0.0)
            vb = tl.load(v_base + cols[:, None] * sv_n + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
            p = tl.where(n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)
        tl.store(dq_ptr + b64 * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :],
                 (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=qmask)

    @triton.jit
    def _dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, map_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
        sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
        map_b, heads, kv_heads, tokens, head_dim, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program: (key block, sample * KV head). It alone writes these rows of dK and
        # dV, summing over the query heads that read this KV head (found by scanning the
        # map row, so in ascending head order) and their query blocks, in a fixed order:
        # no atomics, bitwise-reproducible gradients, and no sort of the map.
        qk_scale = tl.cast(qk_scale, tl.float32)
        sm_scale = tl.cast(sm_scale, tl.float32)
        bg = tl.program_id(1)
        b = bg // kv_heads
        g = bg % kv_heads
        b64 = b.to(tl.int64)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < tokens
        d_ok = offs_d < head_dim
        kmask = n_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_ptr + b64 * sk_b + g * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                     mask=kmask, other=0.0)
        vb = tl.load(v_ptr + b64 * sv_b + g * sv_h + offs_n[:, None] * sv_n + offs_d[None, :],
                     mask=kmask, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for h in range(0, heads):
            own = tl.minimum(tl.maximum(tl.load(map_ptr + b * map_b + h), 0), kv_heads - 1)
            if own == g:
                q_base = q_ptr + b64 * sq_b + h * sq_h
                do_base = do_ptr + b64 * sdo_b + h * sdo_h
                row_base = (b64 * heads + h) * tokens
                for start_m in range(0, tokens, BLOCK_M):
                    rows = start_m + offs_m
                    m_ok = rows < tokens
                    qmask_t = d_ok[:, None] & m_ok[None, :]
                    qt = tl.load(q_base + rows[None, :] * sq_n + offs_d[:, None],
                                 mask=qmask_t, other=0.0)
                    do_t = tl.load(do_base + rows[None, :] * sdo_n + offs_d[:, None],
                                   mask=qmask_t, other=0.0)
                    lse = tl.load(lse_ptr + row_base + rows, mask=m_ok,
                                  other=0.0) * 1.4426950408889634
                    delta = tl.load(delta_ptr + row_base + rows, mask=m_ok, other=0.0)
                    st = tl.dot(kb, qt, input_precision=PRECISION) * qk_scale
                    pt = tl.where(m_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
                    dv += tl.dot(pt.to(do_t.dtype), tl.trans(do_t), input_precision=PRECISION)
                    dpt = tl.dot(vb, do_t, input_precision=PRECISION)
                    dst = pt * (dpt - delta[None, :])
                    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
        tl.store(dk_ptr + b64 * sdk_b + g * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :],
                 (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kmask)
        tl.store(dv_ptr + b64 * sdv_b + g * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kmask)

    def _precision(dtype: torch.dtype) -> str:
        """fp32 inputs are multiplied in full fp32 ("ieee"), not tf32: this op promises fp32
        results close to the math reference; half inputs ignore it."""
        return "ieee" if dtype == torch.float32 else "tf32"

    def _map_stride(head_map: Tensor) -> int:
        """Batch stride of the map: 0 for an ``(H,)`` map shared by the batch."""
        return head_map.stride(0) if head_map.dim() == 2 else 0

    def _inner_contiguous(x: Tensor) -> Tensor:
        return x if x.stride(-1) == 1 else x.contiguous()

    def _token_major(like: Tensor, heads: int) -> Tensor:
        """An empty ``(B, heads, N, D)`` view of a ``(B, N, heads, D)`` tensor: the layout
        of heads cut from a fused projection, so the caller's ``(B, N, heads * D)`` reshape
        (or the backward's concatenation into the qkv gradient) needs no copy."""
        batch, _, tokens, dim = like.shape
        return like.new_empty((batch, tokens, heads, dim)).transpose(1, 2)

    def _block_d(dim: int) -> int:
        return max(triton.next_power_of_2(dim), 16)

    def _strides(*tensors: Tensor) -> list[int]:
        """Batch, head and token strides of each ``(B, heads, N, D)`` tensor, in order."""
        return [x.stride(i) for x in tensors for i in range(3)]

    def _meta(tiles: Tiles, dim: int, dtype: torch.dtype) -> dict[str, Any]:
        """Compile-time parameters and launch settings shared by the three kernels."""
        return {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_D": _block_d(dim),
                "PRECISION": _precision(dtype), "num_warps": tiles.num_warps,
                "num_stages": tiles.num_stages}

    def _kernel(kernel: Any, direct: bool) -> Any:
        """The kernel itself in eager mode (``direct``), or wrapped for ``torch.compile``'s
        tracing inside the ``triton_op``."""
        return kernel if direct else wrap_triton(kernel)

    def launch_forward(
        q: Tensor, k: Tensor, v: Tensor, head_map: Tensor, scale: float, tiles: Tiles,
        direct: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The forward kernel alone: ``(out, lse)`` (``benchmarks/headmap_tune.py`` times it)."""
        batch, heads, tokens, dim = q.shape
        out = _token_major(q, heads)
        lse = q.new_empty((batch, heads, tokens), dtype=torch.float32)
        grid = (triton.cdiv(tokens, tiles.block_m), batch * heads)
        _kernel(_fwd_kernel, direct)[grid](
            q, k, v, head_map, out, lse, *_strides(q, k, v, out),
            _map_stride(head_map), heads, k.shape[1], tokens, dim, scale * _LOG2E,
            **_meta(tiles, dim, q.dtype),
        )
        return out, lse

    def launch_grad_q(
        grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        head_map: Tensor, scale: float, tiles: Tiles, direct: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The dQ kernel alone: ``(dq, delta)``."""
        batch, heads, tokens, dim = q.shape
        delta = lse.new_empty((batch, heads, tokens))
        dq = _token_major(q, heads)
        _kernel(_dq_kernel, direct)[(triton.cdiv(tokens, tiles.block_m), batch * heads)](
            q, k, v, out, grad, head_map, lse, delta, dq, *_strides(q, k, v, out, grad, dq),
            _map_stride(head_map), heads, k.shape[1], tokens, dim, scale * _LOG2E, scale,
            **_meta(tiles, dim, q.dtype),
        )
        return dq, delta

    def launch_grad_kv(
        grad: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
        head_map: Tensor, scale: float, tiles: Tiles, direct: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The dK/dV kernel alone: ``(dk, dv)``."""
        batch, heads, tokens, dim = q.shape
        kv_heads = k.shape[1]
        dk, dv = _token_major(k, kv_heads), _token_major(v, kv_heads)
        _kernel(_dkdv_kernel, direct)[(triton.cdiv(tokens, tiles.block_n), batch * kv_heads)](
            q, k, v, grad, head_map, lse, delta, dk, dv, *_strides(q, k, v, grad, dk, dv),
            _map_stride(head_map), heads, kv_heads, tokens, dim, scale * _LOG2E, scale,
            **_meta(tiles, dim, q.dtype),
        )
        return dk, dv

    @triton_op("kdgqa::headmap_attention_fwd", mutates_args=())
    def _fwd_op(
        q: Tensor, k: Tensor, v: Tensor, head_map: Tensor, scale: float, tiles: list[int],
    ) -> tuple[Tensor, Tensor]:
        if not _use_kernels(q):
            return _reference_forward(q, k, v, head_map, scale)
        q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
        head_map = _inner_contiguous(head_map)
        return launch_forward(q, k, v, head_map, scale, HeadmapTiles.from_flat(tiles).forward)

    @triton_op("kdgqa::headmap_attention_bwd", mutates_args=())
    def _bwd_op(
        grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        head_map: Tensor, scale: float, tiles: list[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not _use_kernels(q):
            return _reference_backward(grad, q, k, v, out, lse, head_map, scale)
        q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
        grad, out = _inner_contiguous(grad), _inner_contiguous(out)
        head_map = _inner_contiguous(head_map)
        chosen = HeadmapTiles.from_flat(tiles)
        dq, delta = launch_grad_q(grad, q, k, v, out, lse, head_map, scale, chosen.grad_q)
        dk, dv = launch_grad_kv(grad, q, k, v, lse, delta, head_map, scale, chosen.grad_kv)
        return dq, dk, dv

    def _setup_context(ctx, inputs, output):
        q, k, v, head_map, scale, tiles = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, head_map)
        ctx.scale, ctx.tiles = scale, tiles

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, head_map = ctx.saved_tensors
        dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, head_map, ctx.scale, ctx.tiles)
        return dq, dk, dv, None, None, None

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    class _EagerHeadmap(torch.autograd.Function):
        """The same kernels, launched directly: outside ``torch.compile`` the custom op's
        dispatch costs host time comparable to the kernels' GPU time at ViT sizes, which
        leaves the GPU idle in eager mode. Same kernels and tiles, so the same bits."""

        @staticmethod
        def forward(
            ctx: Any, q: Tensor, k: Tensor, v: Tensor, head_map: Tensor, scale: float,
            tiles: HeadmapTiles,
        ) -> Tensor:
            q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
            head_map = _inner_contiguous(head_map)
            out, lse = launch_forward(q, k, v, head_map, scale, tiles.forward, direct=True)
            ctx.save_for_backward(q, k, v, out, lse, head_map)
            ctx.scale, ctx.tiles = scale, tiles
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
            q, k, v, out, lse, head_map = ctx.saved_tensors
            grad = _inner_contiguous(grad)
            dq, delta = launch_grad_q(grad, q, k, v, out, lse, head_map, ctx.scale,
                                      ctx.tiles.grad_q, direct=True)
            dk, dv = launch_grad_kv(grad, q, k, v, lse, delta, head_map, ctx.scale,
                                    ctx.tiles.grad_kv, direct=True)
            return dq, dk, dv, None, None, None


def headmap_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_map: Tensor,
    scale: float | None = None,
    *,
    tiles: HeadmapTiles | None = None,
    check_map: bool = True,
) -> Tensor:
    """Softmax attention in which query head ``h`` reads KV head ``head_map[(b,) h]``.

    ``q`` is ``(B, H, N, D)``; ``k`` and ``v`` are ``(B, G, N, D)``; ``head_map`` is an integer
    ``(H,)`` map shared by the batch or ``(B, H)`` per sample, entries in ``[0, G)``. On CUDA
    that is checked by a device-side assert (no host sync; ``check_map=False`` skips it for
    maps built in range, as kdgqa's allocators build them: the kernels clamp entries anyway,
    so a bad map can give wrong numbers but never reads foreign memory). ``scale`` defaults to
    ``D ** -0.5``. No mask, no dropout. On CUDA (or under ``TRITON_INTERPRET=1`` on CPU) it
    runs the Triton kernels, elsewhere the same math in PyTorch; gradients are deterministic
    on both. ``tiles`` overrides the tuned launch settings (:data:`TUNED_TILES`). Returns
    ``(B, H, N, D)``; from the kernels it is a view of token-major ``(B, N, H, D)`` memory, the
    layout the caller's ``(B, N, H * D)`` reshape wants. fp32 inputs are multiplied in full
    fp32 (no tf32), half inputs on tensor cores, always accumulating in fp32.
    """
    if not _HAS_TRITON:  # no op to register: the reference (its CPU backward is ordered)
        return headmap_attention_reference(q, k, v, head_map, scale)
    _check(q, k, v, head_map)
    if tiles is None:
        chosen = default_tiles(q.shape[-1])  # checked by the tests
    else:
        tiles.check()
        chosen = tiles
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if check_map and q.device.type == "cuda":
        torch._assert_async(((head_map >= 0) & (head_map < k.shape[1])).all(),
                            "headmap_attention: head_map entries must be in [0, G)")
    if q.is_cuda and not torch.compiler.is_compiling():
        out: Tensor = _EagerHeadmap.apply(q, k, v, head_map, scale, chosen)
        return out
    out, _ = _fwd_op(q, k, v, head_map, scale, chosen.flat())
    return out
