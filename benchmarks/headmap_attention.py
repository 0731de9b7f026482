"""Uneven query->KV maps without expanding K/V: the head-map kernel beside today's paths.

Attention-op level, bf16, forward and forward+backward, on CUDA. Variants per map:

* ``sdpa_enable_gqa``: SDPA's native GQA (uniform map only: the lower bound to beat);
* ``expand``: the expansion path, ``kdgqa.core.ops.grouped_attention`` with
  ``expand_method="gather"`` (gather K/V to one head per query head, then SDPA as MHA;
  ``--expand-method onehot`` for the deterministic one; ``auto`` would run the kernel);
* ``flex_remap``: FlexAttention with the G KV heads stacked along the key axis as one
  shared head (``(B, 1, G * N, D)``) and a ``mask_mod`` letting query head ``h`` see only
  the keys of KV head ``map[(b,) h]``; the block mask skips the other heads' key blocks.
  A ``score_mod`` alone cannot change which K/V head is read, so this is how Flex expresses
  a head map. ``flex_remap`` builds the block mask once (a static map); ``flex_remap_rebuild``
  builds it every call, as a map that changes every step (kdgqa's) would need;
* ``headmap``: ``kdgqa.core.headmap_attention.headmap_attention``.

Maps: ``uniform`` (contiguous equal groups), ``uneven`` (one head moved from the last group
to the first) and ``per_sample`` (a random ``(B, H)`` map). FLOPs are counted as FlashAttention
does: forward ``4 B H N^2 D`` (two matmuls), backward 2.5x that (five matmuls, recompute
included); MFU is against ``--peak-tflops`` (790 TFLOP/s bf16 dense by default). ``*_ms`` is
one call then a wait (host launch cost included), ``*_queued_ms`` calls queued back to back
(GPU time per call, a training loop's steady state). Each record
also has the largest difference of its output from the ``expand`` output. Prints JSON.

    python benchmarks/headmap_attention.py --out benchmarks/results/headmap_attention_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from attention import emit, forward_and_training_calls, queued_ms, time_ms, uneven_counts
from kdgqa.core.headmap_attention import headmap_attention
from kdgqa.core.ops import grouped_attention
from tiles_file import add_tiles_argument, use_tiles_from

SHAPES: dict[str, dict[str, int]] = {
    "vit_b": {"batch": 256, "tokens": 197, "heads": 12, "kv_heads": 6, "head_dim": 64},
    "vit_l": {"batch": 64, "tokens": 197, "heads": 16, "kv_heads": 8, "head_dim": 64},
    "vit_b_577": {"batch": 32, "tokens": 577, "heads": 12, "kv_heads": 6, "head_dim": 64},
}
MAPS = ("uniform", "uneven", "per_sample")
VARIANTS = ("sdpa_enable_gqa", "expand", "flex_remap", "flex_remap_rebuild", "headmap")


def head_maps(batch: int, heads: int, kv_heads: int, device: str) -> dict[str, Tensor]:
    """The three maps: ``(H,)``, ``(H,)`` and ``(B, H)`` int64 on ``device``."""
    uniform = torch.arange(heads, device=device) // (heads // kv_heads)
    counts = torch.tensor(uneven_counts(heads, kv_heads), device=device)  # 12/6: 3,2,2,2,2,1
    uneven = torch.repeat_interleave(torch.arange(kv_heads, device=device), counts)
    gen = torch.Generator(device=device).manual_seed(0)
    per_sample = torch.randint(0, kv_heads, (batch, heads), device=device, generator=gen)
    return {"uniform": uniform, "uneven": uneven, "per_sample": per_sample}


def build_calls(
    qkv: Tensor, heads: int, kv_heads: int, head_map: Tensor, map_name: str,
    expand_method: str = "gather", compile_flex: bool = True,
) -> dict[str, Callable[[], Tensor]]:
    """One zero-argument callable per variant that applies to ``map_name``, each reading
    q/k/v from the token-major fused projection ``qkv`` ``(B, N, H + 2G, D)``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, tokens, _, dim = qkv.shape
    flex = torch.compile(flex_attention, fullgraph=True) if compile_flex else flex_attention

    def split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, kv = qkv.split([heads, 2 * kv_heads], dim=2)
        k, v = kv.transpose(1, 2).chunk(2, dim=1)
        return q.transpose(1, 2), kv, k, v

    per_sample = head_map.dim() == 2

    def remap(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        own = head_map[b, h] if per_sample else head_map[h]
        return kv_idx // tokens == own

    def block_mask():  # type: ignore[no-untyped-def]
        return create_block_mask(remap, batch if per_sample else None, heads, tokens,
                                 kv_heads * tokens, device=qkv.device)

    static_mask = block_mask()

    def flex_call(mask) -> Tensor:  # type: ignore[no-untyped-def]
        q, _, k, v = split()
        stacked_k = k.reshape(batch, 1, kv_heads * tokens, dim)  # copies: k is a strided view
        stacked_v = v.reshape(batch, 1, kv_heads * tokens, dim)
        return flex(q, stacked_k, stacked_v, block_mask=mask, enable_gqa=True)

    calls: dict[str, Callable[[], Tensor]] = {}
    if map_name == "uniform":
        def native() -> Tensor:
            q, _, k, v = split()
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        calls["sdpa_enable_gqa"] = native

    def expand() -> Tensor:
        q, kv, _, _ = split()
        return grouped_attention(q, kv, head_map, uniform=False, expand_method=expand_method)

    def headmap() -> Tensor:
        q, _, k, v = split()
        return headmap_attention(q, k, v, head_map)

    calls["expand"] = expand
    calls["flex_remap"] = lambda: flex_call(static_mask)
    calls["flex_remap_rebuild"] = lambda: flex_call(block_mask())
    calls["headmap"] = headmap
    return calls


def attention_flops(batch: int, heads: int, tokens: int, dim: int, backward: bool) -> float:
    fwd = 4.0 * batch * heads * tokens * tokens * dim
    return fwd * 3.5 if backward else fwd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--maps", nargs="+", default=list(MAPS), choices=list(MAPS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--expand-method", default="gather",
                        help="kdgqa.core.ops.expand_kv method for the 'expand' variant "
                             "(default gather; auto picks the head-map kernel on CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="dense bf16 peak for MFU (default 790)")
    add_tiles_argument(parser)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    use_tiles_from(args.tiles_from)
    if not torch.cuda.is_available():
        print("benchmarks/headmap_attention.py: error: needs a CUDA device (none is visible); "
              "the kernel's correctness is tested on CPU by tests/core/test_headmap_attention.py",
              file=sys.stderr)
        return 2
    records = []
    for shape_name in args.shapes:
        s = SHAPES[shape_name]
        b, n, h, g, d = s["batch"], s["tokens"], s["heads"], s["kv_heads"], s["head_dim"]
        torch.manual_seed(0)
        qkv = torch.randn(b, n, h + 2 * g, d, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True)
        grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        for map_name, head_map in head_maps(b, h, g, "cuda").items():
            if map_name not in args.maps:
                continue
            torch._dynamo.reset()
            calls = build_calls(qkv, h, g, head_map, map_name, args.expand_method)
            with torch.no_grad():
                reference = calls["expand"]().float()
            for variant, call in calls.items():
                if variant not in args.variants:
                    continue

                fwd, fwd_bwd = forward_and_training_calls(call, qkv, grad)

                rec: dict[str, object] = {
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "shape": shape_name, **s, "map": map_name, "variant": variant,
                    "dtype": "bfloat16",
                }
                try:
                    with torch.no_grad():
                        diff = (call().float() - reference).abs().max().item()
                    rec["max_abs_diff_vs_expand"] = diff
                    for key, fn, backward in (("fwd", fwd, False), ("fwd_bwd", fwd_bwd, True)):
                        ms = time_ms(fn, args.iters, args.warmup)
                        tflops = attention_flops(b, h, n, d, backward) / (ms * 1e-3) / 1e12
                        rec[f"{key}_ms"] = round(ms, 4)
                        rec[f"{key}_tflops"] = round(tflops, 2)
                        rec[f"{key}_mfu"] = round(tflops / args.peak_tflops, 4)
                        queued = queued_ms(fn, args.iters, args.warmup)
                        rec[f"{key}_queued_ms"] = round(queued, 4)
                        rec[f"{key}_queued_tflops"] = round(
                            attention_flops(b, h, n, d, backward) / (queued * 1e-3) / 1e12, 2)
                except Exception as exc:  # one variant failing must not lose the others
                    rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(json.dumps(rec), file=sys.stderr, flush=True)
                records.append(rec)
    emit(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
