"""``kdgqa fidelity CONFIG --data SPEC``: how close each conversion of a study's grid starts to
its MHA model, measured on the task that model was trained for (see
:mod:`kdgqa.study.fidelity`): every cell is converted from ``model.pretrained`` exactly as
``kdgqa experiment`` converts it and compared with the MHA model on a seeded sample of the test
split of ``--data``; no training happens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kdgqa.errors import KdgqaError

NAME = "fidelity"
HELP = ("measure how close each scheme of a study's grid starts to its MHA model on the "
        "model's own task, before uptraining")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="study YAML: its model.pretrained and grid are used")
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="labelled images of the model's own task (its classifier's "
                        "classes): NAME:ROOT or an image folder; the test split is used")
    parser.add_argument("--images", type=int, default=2000, metavar="N",
                        help="test images, a seeded sample (default 2000)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="B")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also one row per attention layer: the MHA model with only that "
                        "layer converted")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="also write every row as JSON (written whole or not at all)")


def _table(rows: list[dict[str, Any]]) -> str:
    layered = any("layer" in r for r in rows)
    lines = ["| scheme | KV heads | " + ("converted layers | " if layered else "")
             + "top-1 % | agrees with MHA % | feature cosine | logit rel. error |",
             "|---|---:|" + ("---:|" if layered else "") + "---:|---:|---:|---:|"]
    for r in rows:
        where = (f"{r['layer']} only | " if "layer" in r else "all | ") if layered else ""
        lines.append(f"| {r['scheme']} | {r['kv_heads']}/{r['num_heads']} | {where}"
                     f"{100 * r['top1']:.2f} | {100 * r['agreement']:.2f} | "
                     f"{r['feature_cosine']:.4f} | {r['logit_relative_error']:.4f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kdgqa.io.durable import atomic_write
    from kdgqa.study.config import load_config, validate
    from kdgqa.study.experiment import environment
    from kdgqa.study.fidelity import grid_fidelity

    if args.images < 1 or args.batch_size < 1:
        raise KdgqaError(f"--images and --batch-size must be >= 1, got {args.images} and "
                         f"{args.batch_size}")
    if args.output is not None and Path(args.output).is_dir():
        raise KdgqaError(f"--output {args.output!r} is a directory; expected a file path")
    config = load_config(args.config, args.overrides)
    validate(config)
    if not config.model.pretrained:
        raise KdgqaError(f"{args.config}: fidelity needs model.pretrained (the MHA model the "
                         "grid converts)")
    started = time.perf_counter()
    rows, images, device = grid_fidelity(config, args.data, images=args.images,
                                 batch_size=args.batch_size, device=args.device,
                                 per_layer=args.per_layer, log=lambda m: print(m, flush=True))
    print(_table(rows))
    if args.output is not None:
        doc = {"config": str(args.config), "overrides": args.overrides,
               "model": config.model.pretrained, "data": args.data, "images": images,
               "device": device, "seconds": round(time.perf_counter() - started, 1),
               **environment(), "rows": rows}
        atomic_write(args.output, [json.dumps(doc, indent=2).encode()])
    return 0
