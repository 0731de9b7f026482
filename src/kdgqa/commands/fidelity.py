"""``kdgqa fidelity CONFIG --data SPEC``: how close each conversion of a study's grid starts to
its MHA model, measured on the task that model was trained for (see :mod:`kdgqa.fidelity`).

Every cell of the config's grid (schemes, variants, options, KV heads, pooling) is converted
from ``model.pretrained`` exactly as ``kdgqa experiment`` converts it, calibrated schemes on the
first images of the study's own training split, then compared with the MHA model on a seeded
sample of the test split of ``--data``; no training happens.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

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
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="also write every row as JSON (written whole or not at all)")


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| scheme | KV heads | top-1 % | agrees with MHA % | feature cosine | "
             "logit rel. error |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['kv_heads']}/{r['num_heads']} | "
                     f"{100 * r['top1']:.2f} | {100 * r['agreement']:.2f} | "
                     f"{r['feature_cosine']:.4f} | {r['logit_relative_error']:.4f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from kdgqa.calibration_data import calibration_arguments, dataset_config
    from kdgqa.config import load_config, resolve_scheme, validate
    from kdgqa.convert import convert
    from kdgqa.data import Batches, check_dataset, load_splits
    from kdgqa.distributed import resolve_device
    from kdgqa.durable import atomic_write
    from kdgqa.experiment import _model_heads, environment
    from kdgqa.fidelity import compare, model_outputs
    from kdgqa.schemes import SCHEMES
    from kdgqa.sources import load_model

    if args.images < 1 or args.batch_size < 1:
        raise ValueError(f"--images and --batch-size must be >= 1, got {args.images} and "
                         f"{args.batch_size}")
    if args.output is not None and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output!r} is a directory; expected a file path")
    config = load_config(args.config, args.overrides)
    validate(config)
    if not config.model.pretrained:
        raise ValueError(f"{args.config}: fidelity needs model.pretrained (the MHA model the "
                         "grid converts)")
    device = resolve_device(args.device)
    started = time.perf_counter()
    size = config.data.image_size
    data_cfg = dataset_config(args.data, size, math.ceil(args.images / 0.2), what="--data")
    check_dataset(data_cfg)
    base = load_model(config.model.pretrained).float().to(device).eval()
    heads = _model_heads(base)
    splits = load_splits(data_cfg)
    classes = int(getattr(base, "num_classes", -1))
    if classes != splits.num_classes:
        raise ValueError(f"the model has {classes} classes but {args.data} has "
                         f"{splits.num_classes}; fidelity needs the data of the model's own "
                         "task (its classifier's classes)")
    test = splits.test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.images]
    test = test.subset(pick.sort().values).to(device)
    batches = Batches(test, args.batch_size, image_size=size, mean=config.data.mean,
                      std=config.data.std, shuffle=False, drop_last=False)
    reference = model_outputs(base, batches.epoch(0))

    cells: list[tuple[str, str, dict[str, Any], int]] = [("mha", "mha", {}, heads)]
    for kv in config.grid.kv_heads:
        cells += [(label, *resolve_scheme(config.grid, label), kv)
                  for label in config.grid.schemes]
    study_train = None
    rows = []
    for label, scheme, options, kv in cells:
        model = copy.deepcopy(base)
        if scheme != "mha":
            extra: dict[str, Any] = {}
            if SCHEMES[scheme].needs_calibration:
                if study_train is None:  # the study's own calibration images, as it uses them
                    study_train = load_splits(config.data, seed=config.seed).train
                extra = calibration_arguments(scheme, options, study_train, config.data)
            convert(model, scheme, kv, pooling=config.grid.pooling, **options, **extra)
        model.to(device)
        torch.manual_seed(config.seed)  # schemes with evaluation-time noise draw the same
        fid = compare(reference, model_outputs(model, batches.epoch(0)))
        rows.append({"scheme": label, "base_scheme": scheme, "scheme_options": options,
                     "kv_heads": kv, "num_heads": heads, **vars(fid)})
        print(f"{label} G={kv}: top-1 {100 * fid.top1:.2f} %, agrees with MHA "
              f"{100 * fid.agreement:.2f} %, feature cosine {fid.feature_cosine:.4f}",
              flush=True)
    table = _table(rows)
    print(table)
    if args.output is not None:
        env = environment()
        doc = {"config": str(args.config), "overrides": args.overrides,
               "model": config.model.pretrained, "data": args.data, "images": len(pick),
               "device": str(device), "seconds": round(time.perf_counter() - started, 1),
               **env, "rows": rows}
        atomic_write(args.output, [json.dumps(doc, indent=2).encode()])
    return 0
