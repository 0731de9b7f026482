"""Pivot the per-layer rows of ``kdgqa fidelity --per-layer -o FILE`` into a markdown table:
one row per layer, one column pair (agreement with MHA's predictions, pre-logit cosine) per
conversion, for one KV-head count.

    python scripts/per_layer_table.py \
        results/study-v2/conversion-fidelity/per-layer.json --kv-heads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="the JSON file kdgqa fidelity -o wrote")
    parser.add_argument("--kv-heads", type=int, required=True)
    args = parser.parse_args()
    rows = [r for r in json.loads(args.rows.read_text())["rows"]
            if r["kv_heads"] == args.kv_heads and r["scheme"] != "mha"]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    layers = sorted({r["layer"] for r in rows if "layer" in r})
    cell = {(r["scheme"], r.get("layer")): r for r in rows}
    print("| converted layer | " + " | ".join(f"{s}: agree % | cos" for s in schemes) + " |")
    print("|---|" + "---:|---:|" * len(schemes))
    for layer in [*layers, None]:
        name = f"{layer} only" if layer is not None else "all"
        cells = []
        for s in schemes:
            r = cell.get((s, layer))
            cells += ([f"{100 * r['agreement']:.1f}", f"{r['feature_cosine']:.3f}"] if r
                      else ["", ""])
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
