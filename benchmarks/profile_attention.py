"""Where does a scheme's time go? Kernel table of one module's forward+backward on CUDA.

    python benchmarks/profile_attention.py --schemes gqa kdgqa pgqa --shape vit_b
    python benchmarks/profile_attention.py --schemes kdgqa --expand-method gather headmap
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from attention import SHAPES, build
from tiles_file import add_tiles_argument, use_tiles_from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["gqa", "kdgqa", "pgqa"])
    parser.add_argument("--shape", default="vit_b", choices=list(SHAPES))
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--expand-method", nargs="+", default=["auto"],
                        help="one table per method (GroupedQueryAttention.expand_method)")
    add_tiles_argument(parser)
    args = parser.parse_args(argv)
    use_tiles_from(args.tiles_from)
    if not torch.cuda.is_available():
        print("benchmarks/profile_attention.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    shape = SHAPES[args.shape]
    for name, method in [(n, m) for n in args.schemes for m in args.expand_method]:
        module = build(name, shape).to("cuda", torch.bfloat16).train()
        if hasattr(module, "expand_method"):
            module.expand_method = method
        x = torch.randn(shape["batch"], shape["tokens"], shape["heads"] * shape["head_dim"],
                        device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(5):
            module(x).sum().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                module(x).sum().backward()
            torch.cuda.synchronize()
        print(f"=== {name} ({method}) @ {args.shape} (10 fwd+bwd)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
