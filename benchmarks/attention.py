"""Attention-module speed: every kdgqa scheme beside an eager per-group loop.

The loop baseline is written the way the paper's official code runs (separate q/k/v
projections, allocation on the host via ``.tolist()``, one matmul-softmax-matmul per group),
so the comparison shows what the fused, sync-free path buys. Prints a JSON list of records
``{device, shape, scheme, fwd_ms, fwd_bwd_ms, ...}`` and optionally writes it to ``--out``.

``calibrated`` is timed with a fixed uneven allocation (:func:`uneven_counts`, recorded as
``counts``): its speed depends only on the group sizes, not on how they were measured.
``similarity`` is static GQA with permuted heads, the same op as ``gqa``.

    python benchmarks/attention.py --out benchmarks/results/attention_h200.json
    python benchmarks/attention.py --schemes gqa calibrated --expand-method split
    python benchmarks/attention.py --schemes gqa kdgqa --expand-method gather headmap
    python benchmarks/attention.py --schemes gqa pgqa --shapes vit_b --perturb-method autograd
    python benchmarks/attention.py --device cpu --shapes tiny --iters 3 --warmup 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdgqa
from kdgqa.core.apportion import even_counts
from kdgqa.core.perturb import PERTURB_METHODS
from tiles_file import add_tiles_argument, use_tiles_from

SHAPES: dict[str, dict[str, int]] = {
    "vit_b": {"batch": 256, "tokens": 197, "heads": 12, "kv_heads": 6, "head_dim": 64},
    "vit_l": {"batch": 128, "tokens": 197, "heads": 16, "kv_heads": 4, "head_dim": 64},
    "vit_b_384": {"batch": 32, "tokens": 577, "heads": 12, "kv_heads": 6, "head_dim": 64},
    "tiny": {"batch": 4, "tokens": 17, "heads": 6, "kv_heads": 3, "head_dim": 8},
}
DEFAULT_SHAPES = ("vit_b", "vit_l", "vit_b_384")
SCHEMES = ("mha", "gqa", "kdgqa", "dgqa-ema", "dgqa-diff", "pgqa", "mqa", "kdgqa-ps",
           "calibrated", "similarity")
# Schemes whose head map can be uneven or per sample: the ones --expand-method changes.
UNEVEN_SCHEMES = ("kdgqa", "dgqa-ema", "dgqa-diff", "kdgqa-ps", "calibrated")
LOOP_KINDS = ("loop-gqa", "loop-kdgqa", "loop-pgqa")


class PerGroupLoopAttention(nn.Module):
    """Eager baseline in the style of the official code (own code, same execution pattern)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, kind: str) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.kind = heads, kv_heads, kind
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def _counts(self, k: Tensor) -> list[int]:
        if self.kind != "loop-kdgqa":
            return even_counts(self.heads, self.kv_heads)
        norms = torch.norm(k, dim=(2, 3)).sum(0)
        norms = (norms - norms.min()) / (norms.max() - norms.min())
        alloc = (norms / norms.sum() * self.heads).round().int()
        while alloc.sum() > self.heads:
            alloc[torch.argmax(alloc)] -= 1
        while alloc.sum() < self.heads:
            alloc[torch.argmin(alloc)] += 1
        return alloc.tolist()

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2) * self.head_dim**-0.5
        k = self.k(x).view(b, n, self.kv_heads, -1).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, -1).transpose(1, 2)
        outs = []
        for qg, kg, vg in zip(
            torch.split(q, self._counts(k), dim=1), k.split(1, 1), v.split(1, 1), strict=True
        ):
            o = F.softmax(qg @ kg.transpose(-2, -1), dim=-1) @ vg
            if self.kind == "loop-pgqa" and o.shape[1] > 0:
                flat = o.reshape(b, o.shape[1], -1)
                noise = torch.rand(flat.shape[1:], device=x.device)
                noise = (noise - noise.mean(-1, keepdim=True)) / noise.std(-1, keepdim=True)
                o = (flat - (noise * flat.std(-1, keepdim=True) + flat.mean(-1, keepdim=True)))
                o = o.to(x.dtype).view(b, -1, n, self.head_dim)
            outs.append(o)
        return self.proj(torch.cat(outs, 1).transpose(1, 2).reshape(b, n, c))


def emit(records: list[dict[str, object]], out: Path | None) -> None:
    """Print the JSON list, and write it to ``out`` when given."""
    text = json.dumps(records, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def uneven_counts(heads: int, kv_heads: int) -> list[int]:
    """A mildly uneven static allocation: even groups with one head moved from the last
    group to the first (12/6 -> [3, 2, 2, 2, 2, 1]: three group sizes, three SDPA calls)."""
    counts = even_counts(heads, kv_heads)
    if kv_heads > 1 and counts[-1] > 1:
        counts[0] += 1
        counts[-1] -= 1
    return counts


def time_ms(fn: Callable[[], object], iters: int, warmup: int, cuda: bool = True) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events; wall clock on the CPU)."""
    if not cuda:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_and_training_calls(
    call: Callable[[], Tensor], leaf: Tensor, grad: Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two timed callables around ``call``: forward under ``no_grad``, and forward+backward
    into ``leaf`` (its gradient reset each time) with ``grad`` as the output gradient."""

    def fwd() -> None:
        with torch.no_grad():
            call()

    def fwd_bwd() -> None:
        leaf.grad = None
        call().backward(grad)

    return fwd, fwd_bwd


def queued_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """GPU time per call with ``iters`` calls queued back to back between two CUDA events, as
    in a training loop where the host runs ahead: launch cost counts only when the host
    cannot keep the GPU busy. Beside :func:`time_ms` (one call, then wait), which also counts
    the host's launch cost of every call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def build(name: str, shape: dict[str, int]) -> nn.Module:
    dim = shape["heads"] * shape["head_dim"]
    heads, kv = shape["heads"], shape["kv_heads"]
    if name.startswith("loop-"):
        return PerGroupLoopAttention(dim, heads, kv, name)
    kv = {"mha": heads, "mqa": 1}.get(name, kv)
    module = kdgqa.GroupedQueryAttention(dim, heads, kv, name)
    if name == "calibrated":
        allocator: Any = module.allocator
        allocator.set_groups(uneven_counts(heads, kv), list(range(heads)))
    return module


def sync_free(module: nn.Module, x: Tensor) -> bool:
    """True when a training forward+backward never synchronises with the host."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x).float().sum().backward()
        ok = True
    except RuntimeError:
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return ok


def measure(
    name: str, shape_name: str, args: argparse.Namespace, expand_method: str = "auto"
) -> dict[str, object]:
    shape = SHAPES[shape_name]
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    torch._dynamo.reset()  # every scheme compiles afresh, within dynamo's recompile limit
    module = build(name, shape).to(device, dtype).train()
    dim = shape["heads"] * shape["head_dim"]
    x = torch.randn(shape["batch"], shape["tokens"], dim, device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    grad = torch.randn_like(x)
    if isinstance(module, kdgqa.GroupedQueryAttention):
        module.expand_method = expand_method
        if hasattr(module.allocator, "perturb_method"):
            module.allocator.perturb_method = args.perturb_method
    run = torch.compile(module, fullgraph=True) if args.compile else module

    def fwd() -> None:
        with torch.no_grad():
            run(x)

    def fwd_bwd() -> None:
        for p in module.parameters():
            p.grad = None
        xg.grad = None
        run(xg).backward(grad)

    record: dict[str, object] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": shape_name,
        **shape,
        "scheme": name,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": args.compile,
        "expand_method": expand_method,
        **({"perturb_method": args.perturb_method} if name == "pgqa" else {}),
        "fwd_ms": round(time_ms(fwd, args.iters, args.warmup, device == "cuda"), 4),
        "fwd_bwd_ms": round(time_ms(fwd_bwd, args.iters, args.warmup, device == "cuda"), 4),
        **({"fwd_queued_ms": round(queued_ms(fwd, args.iters, args.warmup), 4),
            "fwd_bwd_queued_ms": round(queued_ms(fwd_bwd, args.iters, args.warmup), 4)}
           if device == "cuda" else {}),
        "torch": torch.__version__,
    }
    if isinstance(module, kdgqa.GroupedQueryAttention):
        record["counts"] = torch.bincount(
            module.allocator.static_kv_index.cpu(), minlength=module.num_kv_heads).tolist()
        if module.allocator.key_driven:
            record["counts"] = "dynamic"
    if not name.startswith("loop-") and device == "cuda":
        record["sync_free_fwd_bwd"] = sync_free(run, xg)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    parser.add_argument("--schemes", nargs="+", default=[*SCHEMES, *LOOP_KINDS],
                        choices=[*SCHEMES, *LOOP_KINDS])
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True)")
    parser.add_argument("--expand-method", nargs="+", default=["auto"],
                        choices=["auto", "triton", "index_select", "advanced_index", "gather",
                                 "onehot", "split", "headmap"],
                        help="one row per method for schemes with uneven or per-sample maps "
                             "(uniform schemes run once, with the first)")
    parser.add_argument("--perturb-method", default="auto", choices=list(PERTURB_METHODS),
                        help="how pgqa's noise step runs (autograd: the plain tensor ops)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: fp32 wall-clock smoke run (no sync check)")
    add_tiles_argument(parser)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the JSON list here")
    args = parser.parse_args(argv)
    use_tiles_from(args.tiles_from)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/attention.py: error: needs a CUDA device (or --device cpu)",
              file=sys.stderr)
        return 2
    records = []
    for shape_name in args.shapes:
        for name in args.schemes:
            if args.compile and name.startswith("loop-"):
                continue
            methods = args.expand_method if name in UNEVEN_SCHEMES else args.expand_method[:1]
            for method in methods:
                if method == "split" and name != "calibrated":  # nothing static to split
                    continue
                record = measure(name, shape_name, args, method)
                print(json.dumps(record), file=sys.stderr, flush=True)
                records.append(record)
    emit(records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
