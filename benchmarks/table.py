"""Markdown table of an attention benchmark JSON, with each scheme's ratio to ``gqa``.

    python benchmarks/table.py benchmarks/results/attention_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)
    print("| shape | scheme | compiled | fwd ms | fwd+bwd ms | fwd+bwd / gqa |")
    print("|---|---|---|---:|---:|---:|")
    for path in args.results:
        records = json.loads(path.read_text())
        base = {(r["shape"], r["compiled"]): r["fwd_bwd_ms"] for r in records
                if r["scheme"] == "gqa"}
        for r in records:
            ratio = r["fwd_bwd_ms"] / base[(r["shape"], r["compiled"])]
            print(f"| {r['shape']} | {r['scheme']} | {'yes' if r['compiled'] else 'no'} | "
                  f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
