"""Which way of serving uneven groups is fastest? Attention-op level, fwd+bwd, bf16.

K/V arrive token-major ``(B, N, 2G, D)`` as the fused projection makes them. Compares SDPA's
native ``enable_gqa`` (uniform groups only) with K/V expanded to one head per query head by
each method of ``kdgqa.core.ops.expand_kv``, on a uniform and an uneven map. Prints JSON.

    python benchmarks/kv_expand.py --out benchmarks/results/kv_expand_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attention import SHAPES, emit, forward_and_training_calls, time_ms
from kdgqa.core.apportion import counts_to_kv_index
from kdgqa.core.ops import grouped_attention

VARIANTS = ("native_enable_gqa", "triton", "index_select", "advanced_index", "gather", "onehot")


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
        qkv = torch.randn(b, n, h + 2 * g, d, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True)
        grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        uneven = torch.full((g,), h // g, device="cuda")
        uneven[0], uneven[-1] = 1, h // g + (h // g - 1)
        maps = {
            "uniform": torch.arange(h, device="cuda") // (h // g),
            "uneven": counts_to_kv_index(uneven, h),
        }
        for variant in VARIANTS:
            for map_name, index in maps.items():
                native = variant == "native_enable_gqa"
                if native and map_name != "uniform":
                    continue
                method = "index_select" if native else variant

                def call(index=index, native=native, method=method, qkv=qkv, h=h, g=g):  # type: ignore[no-untyped-def]
                    q, kv = qkv.split([h, 2 * g], dim=2)
                    return grouped_attention(q.transpose(1, 2), kv, index, uniform=native,
                                             expand_method=method)

                fwd, fwd_bwd = forward_and_training_calls(call, qkv, grad)

                rec = {
                    "device": torch.cuda.get_device_name(), "shape": shape_name, **s,
                    "variant": variant, "map": map_name,
                    "fwd_ms": round(time_ms(fwd, args.iters, args.warmup), 4),
                    "fwd_bwd_ms": round(time_ms(fwd_bwd, args.iters, args.warmup), 4),
                }
                print(json.dumps(rec), file=sys.stderr, flush=True)
                records.append(rec)
    emit(records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
