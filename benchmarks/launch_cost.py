"""Host time to launch one attention call: where eager mode's per-call overhead goes.

For SDPA's native GQA and the head-map kernel (through the op, and the bare Triton launch
underneath), the host-side microseconds per call with nothing waited for, forward and
forward+backward, at the ViT-B shape (bf16). A call whose host time exceeds its GPU time
leaves the GPU idle in eager mode unless other work is queued. Prints JSON.

    python benchmarks/launch_cost.py
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdgqa.core import headmap_attention as hm


def host_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Median over 5 rounds of the host time per call, ``calls`` calls without waiting."""
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/launch_cost.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    b, n, h, g, d = 256, 197, 12, 6, 64
    qkv = torch.randn(b, n, h + 2 * g, d, device="cuda", dtype=torch.bfloat16,
                      requires_grad=True)
    q, k, v = qkv.transpose(1, 2).split([h, g, g], dim=1)
    head_map = torch.arange(h, device="cuda") // 2
    grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    tiles = hm.default_tiles(d)

    def bare() -> None:
        hm.launch_forward(q.detach(), k.detach(), v.detach(), head_map, d ** -0.5,
                          tiles.forward, direct=True)

    calls: dict[str, Callable[[], object]] = {
        "sdpa_gqa_fwd": lambda: F.scaled_dot_product_attention(
            q.detach(), k.detach(), v.detach(), enable_gqa=True),
        "headmap_fwd_no_grad": lambda: hm.headmap_attention(
            q.detach(), k.detach(), v.detach(), head_map, check_map=False),
        "headmap_fwd_checked_map": lambda: hm.headmap_attention(
            q.detach(), k.detach(), v.detach(), head_map),
        "bare_triton_fwd_launch": bare,
        "sdpa_gqa_fwd_bwd": lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True), qkv, grad),
        "headmap_fwd_bwd": lambda: torch.autograd.grad(
            hm.headmap_attention(q, k, v, head_map, check_map=False), qkv, grad),
    }
    records = [{"call": name, "host_us": round(host_us(fn), 1),
                "device": torch.cuda.get_device_name(), "torch": torch.__version__}
               for name, fn in calls.items()]
    print(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
