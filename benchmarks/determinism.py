"""Are two identical attention training steps bitwise equal on CUDA, and what does it cost?

For each scheme, in a fresh process per mode (torch's determinism switch and cuBLAS's
workspace setting are process-wide): the same forward + backward twice from the same state,
whether every gradient matches bit for bit (and the largest difference when not), and the
step time. ``default`` is torch as it comes; ``deterministic`` is
``torch.use_deterministic_algorithms(True)`` with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, under
which ``kdgqa.core.ops.expand_kv`` expands K/V by a one-hot matmul instead of a gather. Prints JSON.

    python benchmarks/determinism.py --schemes gqa kdgqa dgqa-ema kdgqa-ps --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, sys, time
import torch
from kdgqa import GroupedQueryAttention

scheme, deterministic, tokens, iters = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), \\
    int(sys.argv[4])
torch.use_deterministic_algorithms(deterministic)

def step(module, x):
    with torch.autocast("cuda", torch.bfloat16):
        module(x).float().square().mean().backward()

def grads():
    torch.manual_seed(0)
    module = GroupedQueryAttention(768, 12, 4, scheme).cuda()
    x = torch.randn(64, tokens, 768, device="cuda", requires_grad=True)
    step(module, x)
    return module, x, [x.grad] + [p.grad for p in module.parameters()]

module, x, first = grads()
_, _, second = grads()
diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(first, second))
for _ in range(5):
    step(module, x)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(iters):
    step(module, x)
end.record()
torch.cuda.synchronize()
print(json.dumps({"scheme": scheme, "deterministic": deterministic, "tokens": tokens,
                  "bitwise_equal": all(torch.equal(a, b) for a, b in zip(first, second)),
                  "max_abs_diff": diff, "ms_per_step": start.elapsed_time(end) / iters,
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
"""


def measure(scheme: str, deterministic: bool, tokens: int, iters: int) -> dict[str, object]:
    env = {**os.environ}
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, scheme, "1" if deterministic else "0", str(tokens),
         str(iters)], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"scheme": scheme, "deterministic": deterministic, "tokens": tokens,
                "error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["gqa", "kdgqa", "dgqa-ema", "kdgqa-ps"])
    parser.add_argument("--tokens", type=int, default=197, help="ViT-B/16 at 224 px: 197")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also write the JSON list here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/determinism.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    rows = [measure(scheme, deterministic, args.tokens, args.iters)
            for scheme in args.schemes for deterministic in (False, True)]
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
