"""Choose the head-map kernels' launch settings: time every candidate tile of each kernel.

Each of the three kernels (forward, dQ, dK/dV) is timed alone, with the other two at their
current settings, over candidate ``(block_m, block_n, num_warps, num_stages)``; bf16, an
uneven ``(H,)`` map, inputs cut from a token-major fused projection as the module makes them.
Per head dim the choice is the candidate with the smallest geometric mean over that dim's
shapes of time / the shape's best time, so one setting serves every shape (the kernels take
one fixed setting per head dim: see ``kdgqa.core.headmap_attention.TUNED_TILES``).

Two phases, so compilation runs in parallel and timing does not share a GPU:

    python benchmarks/headmap_tune.py --phase compile --shard 0 --shards 12 &  # ... 11
    python benchmarks/headmap_tune.py --phase time --dims 64 --out tune_64.json
    python benchmarks/headmap_tune.py --merge tune_*.json \
        --out benchmarks/results/headmap_tune_h200.json

The ``time`` phase prints (and writes) JSON records; ``--merge`` adds the chosen settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from attention import queued_ms, uneven_counts
from kdgqa.core import headmap_attention as hm

SHAPES: dict[str, dict[str, int]] = {
    "vit_b": {"batch": 256, "tokens": 197, "heads": 12, "kv_heads": 6, "head_dim": 64},
    "vit_l": {"batch": 64, "tokens": 197, "heads": 16, "kv_heads": 8, "head_dim": 64},
    "vit_b_577": {"batch": 32, "tokens": 577, "heads": 12, "kv_heads": 6, "head_dim": 64},
    "d32": {"batch": 128, "tokens": 197, "heads": 12, "kv_heads": 6, "head_dim": 32},
    "d128": {"batch": 128, "tokens": 197, "heads": 8, "kv_heads": 4, "head_dim": 128},
    "d128_577": {"batch": 16, "tokens": 577, "heads": 8, "kv_heads": 4, "head_dim": 128},
}
KERNELS = ("forward", "grad_q", "grad_kv")


def candidates(kernel: str) -> list[hm.Tiles]:
    blocks_m = (32, 64, 128) if kernel == "grad_kv" else (64, 128)
    stages = (1, 2, 3) if kernel == "grad_kv" else (2, 3, 4)
    return [hm.Tiles(m, n, w, s) for m, n, w, s in
            itertools.product(blocks_m, (32, 64, 128), (4, 8), stages)]


def inputs(shape: dict[str, int]) -> dict[str, Tensor]:
    b, n, h, g, d = (shape[x] for x in ("batch", "tokens", "heads", "kv_heads", "head_dim"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b, n, h + 2 * g, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv.transpose(1, 2).split([h, g, g], dim=1)
    counts = torch.tensor(uneven_counts(h, g), device="cuda")
    head_map = torch.repeat_interleave(torch.arange(g, device="cuda"), counts)
    grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    tiles = hm.default_tiles(d)
    grad = grad.transpose(1, 2).contiguous().transpose(1, 2)  # token-major, as autograd's
    out, lse = hm.launch_forward(q, k, v, head_map, d ** -0.5, tiles.forward, direct=True)
    _, delta = hm.launch_grad_q(grad, q, k, v, out, lse, head_map, d ** -0.5, tiles.grad_q,
                                direct=True)
    return {"q": q, "k": k, "v": v, "map": head_map, "grad": grad, "out": out, "lse": lse,
            "delta": delta}


def call(kernel: str, x: dict[str, Tensor], tiles: hm.Tiles) -> Callable[[], object]:
    scale = x["q"].shape[-1] ** -0.5
    if kernel == "forward":
        return lambda: hm.launch_forward(x["q"], x["k"], x["v"], x["map"], scale, tiles,
                                         direct=True)
    if kernel == "grad_q":
        return lambda: hm.launch_grad_q(x["grad"], x["q"], x["k"], x["v"], x["out"], x["lse"],
                                        x["map"], scale, tiles, direct=True)
    return lambda: hm.launch_grad_kv(x["grad"], x["q"], x["k"], x["v"], x["lse"], x["delta"],
                                     x["map"], scale, tiles, direct=True)


def back_to_back_ms(fn: Callable[[], object], iters: int, repeats: int = 3) -> float:
    """Best of ``repeats`` :func:`attention.queued_ms` measurements (launches queued back to
    back, so the host's launch cost overlaps the previous kernel, as in a training step)."""
    return min(queued_ms(fn, iters, warmup=1) for _ in range(repeats))


def flops(kernel: str, shape: dict[str, int]) -> float:
    """Matmul FLOPs the kernel does: forward 2 matmuls, dQ 3 (S, dP, dQ), dK/dV 4."""
    one = 2.0 * shape["batch"] * shape["heads"] * shape["tokens"] ** 2 * shape["head_dim"]
    return one * {"forward": 2, "grad_q": 3, "grad_kv": 4}[kernel]


def jobs(dims: list[int]) -> list[tuple[str, str, hm.Tiles]]:
    return [(name, kernel, tiles) for name, shape in SHAPES.items()
            if shape["head_dim"] in dims for kernel in KERNELS for tiles in candidates(kernel)]


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    todo = jobs(args.dims)
    if args.phase == "compile":  # one shape per head dim compiles every specialisation
        firsts: dict[tuple[int, str, hm.Tiles], tuple[str, str, hm.Tiles]] = {}
        for job in todo:
            firsts.setdefault((SHAPES[job[0]]["head_dim"], job[1], job[2]), job)
        todo = list(firsts.values())[args.shard::args.shards]
    cache: dict[str, dict[str, Tensor]] = {}
    records: list[dict[str, object]] = []
    for name, kernel, tiles in todo:
        if name not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[name] = inputs(SHAPES[name])
        rec: dict[str, object] = {"device": torch.cuda.get_device_name(), "shape": name,
                                  **SHAPES[name], "kernel": kernel,
                                  "tiles": list(vars(tiles).values())}
        try:
            fn = call(kernel, cache[name], tiles)
            if args.phase == "compile":
                fn()
                torch.cuda.synchronize()
                continue
            ms = back_to_back_ms(fn, args.iters)
            rec["ms"] = round(ms, 5)
            rec["tflops"] = round(flops(kernel, SHAPES[name]) / (ms * 1e-3) / 1e12, 1)
        except Exception as exc:  # out of shared memory or registers: not a candidate
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if args.phase == "time":
            print(json.dumps(rec), file=sys.stderr, flush=True)
            records.append(rec)
    return records


def choose(records: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """Per head dim and kernel: the tiles with the least geometric-mean slowdown vs each
    shape's best, over the shapes of that dim where every chosen candidate ran."""
    best_ms: dict[tuple[str, str], float] = {}
    for r in records:
        if "ms" in r:
            key = (str(r["shape"]), str(r["kernel"]))
            best_ms[key] = min(best_ms.get(key, math.inf), float(r["ms"]))  # type: ignore[arg-type]
    ratios: dict[tuple[int, str, tuple[int, ...]], list[float]] = {}
    shapes_per: dict[tuple[int, str], set[str]] = {}
    for r in records:
        if "ms" not in r:
            continue
        dim, kernel, shape = int(r["head_dim"]), str(r["kernel"]), str(r["shape"])  # type: ignore[call-overload]
        ratios.setdefault((dim, kernel, tuple(r["tiles"])), []).append(  # type: ignore[arg-type]
            float(r["ms"]) / best_ms[(shape, kernel)])  # type: ignore[arg-type]
        shapes_per.setdefault((dim, kernel), set()).add(shape)
    chosen: dict[str, dict[str, object]] = {}
    for (dim, kernel), shapes in sorted(shapes_per.items()):
        full = {t: rs for (d, k, t), rs in ratios.items()
                if d == dim and k == kernel and len(rs) == len(shapes)}
        tiles, rs = min(full.items(), key=lambda item: math.prod(item[1]) ** (1 / len(item[1])))
        chosen.setdefault(str(dim), {})[kernel] = {
            "tiles": list(tiles), "slowdown_vs_best_per_shape": [round(x, 3) for x in rs],
            "shapes": sorted(shapes)}
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["compile", "time"], default="time")
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20, help="calls per timed batch")
    parser.add_argument("--merge", type=Path, nargs="+", help="time-phase JSON files to merge")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.merge:
        records = [r for path in args.merge for r in json.loads(path.read_text())["records"]]
        if not records:
            print("benchmarks/headmap_tune.py: error: no records in --merge files", file=sys.stderr)
            return 2
    else:
        if not torch.cuda.is_available():
            print("benchmarks/headmap_tune.py: error: needs a CUDA device", file=sys.stderr)
            return 2
        records = run(args)
        if args.phase == "compile":
            return 0
    result = {"torch": torch.__version__, "chosen": choose(records), "records": records}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(result["chosen"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
