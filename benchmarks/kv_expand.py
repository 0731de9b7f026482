"""Which way of serving uneven groups is fastest? Attention-op level, fwd+bwd, bf16.

Compares, at one shape: SDPA's native ``enable_gqa`` (uniform groups only), K/V expanded by
``index_select`` (what kdgqa uses), by ``gather``, and by a one-hot matmul. Prints JSON.

    python benchmarks/kv_expand.py --out benchmarks/results/kv_expand_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attention import SHAPES, time_ms
from kdgqa.allocation import counts_to_kv_index


def native(q: Tensor, k: Tensor, v: Tensor, index: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def by_index_select(q: Tensor, k: Tensor, v: Tensor, index: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k.index_select(1, index), v.index_select(1, index))


def by_stacked_index_select(q: Tensor, k: Tensor, v: Tensor, index: Tensor) -> Tensor:
    kv = torch.stack((k, v), 1).index_select(2, index)
    return F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1])


def by_gather(q: Tensor, k: Tensor, v: Tensor, index: Tensor) -> Tensor:
    idx = index[None, :, None, None].expand(q.shape[0], -1, q.shape[2], q.shape[3])
    return F.scaled_dot_product_attention(q, k.gather(1, idx), v.gather(1, idx))


def by_one_hot(q: Tensor, k: Tensor, v: Tensor, index: Tensor) -> Tensor:
    onehot = F.one_hot(index, k.shape[1]).to(k.dtype)
    ke = torch.einsum("hg,bgnd->bhnd", onehot, k)
    ve = torch.einsum("hg,bgnd->bhnd", onehot, v)
    return F.scaled_dot_product_attention(q, ke, ve)


def time_variant(
    fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    qkv: tuple[Tensor, Tensor, Tensor],
    index: Tensor,
    grad: Tensor,
    args: argparse.Namespace,
) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one variant."""

    def fwd() -> None:
        with torch.no_grad():
            fn(*qkv, index)

    def fwd_bwd() -> None:
        for t in qkv:
            t.grad = None
        fn(*qkv, index).backward(grad)

    return time_ms(fwd, args.iters, args.warmup), time_ms(fwd_bwd, args.iters, args.warmup)


VARIANTS = {
    "sdpa_enable_gqa_uniform": native,
    "index_select": by_index_select,
    "stacked_index_select": by_stacked_index_select,
    "gather": by_gather,
    "one_hot_matmul": by_one_hot,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kv_expand.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    records = []
    for shape_name in args.shapes:
        s = SHAPES[shape_name]
        b, n, h, g, d = s["batch"], s["tokens"], s["heads"], s["kv_heads"], s["head_dim"]
        opts = {"device": "cuda", "dtype": torch.bfloat16, "requires_grad": True}
        q = torch.randn(b, h, n, d, **opts)
        k = torch.randn(b, g, n, d, **opts)
        v = torch.randn(b, g, n, d, **opts)
        grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        uneven = torch.tensor([1] + [h // g] * (g - 2) + [h // g + 1] * 1, device="cuda")
        uneven[-1] += h - int(uneven.sum())
        maps = {
            "uniform": torch.arange(h, device="cuda") // (h // g),
            "uneven": counts_to_kv_index(uneven, h),
        }
        for variant, fn in VARIANTS.items():
            for map_name, index in maps.items():
                if variant.endswith("_uniform") and map_name != "uniform":
                    continue
                fwd_ms, fwd_bwd_ms = time_variant(fn, (q, k, v), index, grad, args)
                rec = {
                    "device": torch.cuda.get_device_name(), "shape": shape_name, **s,
                    "variant": variant, "map": map_name,
                    "fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(fwd_bwd_ms, 4),
                }
                print(json.dumps(rec), file=sys.stderr, flush=True)
                records.append(rec)
    text = json.dumps(records, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
