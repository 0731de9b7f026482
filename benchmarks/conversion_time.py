"""How long a whole conversion takes: mean pooling, fit, align + fit, and layer-wise
distillation, for a ViT (a local checkpoint or a randomly initialised timm architecture) on
N calibration images. Wall time of ``kdgqa.convert`` (measuring, fitting, aligning included)
and of ``distill_layers``; each setting on a fresh copy of the model, once. Prints JSON.

    python benchmarks/conversion_time.py --model .data/study-v2-model --images 512 --kv-heads 2 4
    python benchmarks/conversion_time.py --arch vit_base_patch16_224 --device cuda --images 512
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from kdgqa.conversion.converter import convert
from kdgqa.conversion.distill import distill_layers
from kdgqa.io.sources import load_model
from kdgqa.models.registry import family_of
from kdgqa.version import __version__

SETTINGS = {"mean": {}, "fit": {"pooling": "fit"},
            "align+fit": {"pooling": "fit", "align": True}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model source kdgqa.load_model reads")
    source.add_argument("--arch", help="a timm architecture, randomly initialised")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[2])
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.model:
        model = load_model(args.model).float()
    else:
        import timm

        model = timm.create_model(args.arch, pretrained=False)
    model = model.to(device).eval()
    family = family_of(model)
    if family is None:
        print(f"benchmarks/conversion_time.py: error: cannot convert a {type(model).__name__}",
              file=sys.stderr)
        return 2
    geometry = family.input_geometry(model)
    images = torch.randn(args.images, geometry.channels, geometry.image_size,
                         geometry.image_size, generator=torch.Generator().manual_seed(0))
    records = []
    for kv in args.kv_heads:
        for name, options in SETTINGS.items():
            copy_ = copy.deepcopy(model)
            _sync(device)
            start = time.perf_counter()
            extra = {"calibration": images} if options else {}
            convert(copy_, "gqa", kv, **options, **extra)  # type: ignore[arg-type]
            _sync(device)
            seconds = time.perf_counter() - start
            records.append({"setting": name, "kv_heads": kv, "convert_s": round(seconds, 3)})
            if name == "align+fit" and args.distill_steps:
                start = time.perf_counter()
                distill_layers(copy_, model, images, steps=args.distill_steps)
                _sync(device)
                records.append({"setting": "align+fit+distill", "kv_heads": kv,
                                 "distill_s": round(time.perf_counter() - start, 3),
                                 "distill_steps": args.distill_steps})
    result = {"source": args.model or f"timm:{args.arch} (random init)", "device": str(device),
              "images": args.images, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "kdgqa": __version__, "rows": records}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
