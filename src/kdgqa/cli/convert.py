"""``kdgqa convert``: pretrained MHA model -> grouped-query model directory, with a summary."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kdgqa.conversion.options import DATA_POOLING, FIT_CALIBRATION_IMAGES, POOLING_METHODS
from kdgqa.errors import KdgqaError
from kdgqa.study.config import DATASETS

NAME = "convert"
HELP = "convert a pretrained multi-head ViT (timm or Hugging Face) to a grouped-query scheme"


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="SRC",
                        help="timm:NAME, a timm checkpoint file, or a HF/timm/kdgqa directory")
    parser.add_argument("--scheme", required=True,
                        help="allocation scheme; `kdgqa schemes` lists them with their options")
    parser.add_argument("--kv-heads", required=True, type=int, metavar="G",
                        help="number of KV heads per layer")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--pooling", default="mean", choices=POOLING_METHODS,
                        help="how K/V heads start (default: mean of each group; fit: solved "
                        "from --calibration images to keep the layer's function)")
    parser.add_argument("--align", action="store_true",
                        help="rotate each head into its group's common basis before pooling "
                        "(the same function; needs --calibration)")
    parser.add_argument("--attention-pool", choices=("keep", "gqa"), default="keep",
                        help="timm's attention-pooling head (global_pool='map'): keep it "
                        "multi-head (default; one query, no KV cache) or give it G K/V heads")
    parser.add_argument("--option", action="append", type=_key_value, default=[],
                        metavar="KEY=VALUE", help="scheme option, e.g. window_size=300")
    parser.add_argument("--calibration", default=None, metavar="SPEC",
                        help="images that choose the groups of calibrated/similarity: "
                        f"NAME:ROOT ({', '.join(d for d in DATASETS if d != 'digits')}), "
                        "digits, or an image folder")
    parser.add_argument("--calibration-images", type=int, default=None, metavar="N",
                        help="calibration images to use (default: the scheme's, 512)")
    parser.add_argument("--calibration-mean", type=_floats, default=None, metavar="M[,M,M]",
                        help="normalisation mean of the model's inputs (default: the timm "
                        "model's pretrained_cfg, else 0.5)")
    parser.add_argument("--calibration-std", type=_floats, default=None, metavar="S[,S,S]",
                        help="normalisation std (default: as for the mean)")
    parser.add_argument("--arch", default=None,
                        help="timm architecture of a checkpoint file without config.json")
    parser.add_argument("--model-arg", action="append", type=_key_value, default=[],
                        metavar="KEY=VALUE", help="timm constructor argument for --arch")
    parser.add_argument("--format", choices=("kdgqa", "mha", "native"), default="kdgqa",
                        help="kdgqa checkpoint (default), a plain MHA export (static schemes), "
                        "or a native timm GQA export with G K/V heads (timm Eva and ViT "
                        "sources, contiguous equal groups; needs a timm whose Eva takes "
                        "num_kv_heads)")
    parser.add_argument("--max-shard-size", default="10GB", help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")


def run(args: argparse.Namespace) -> int:
    from kdgqa.conversion.converter import convert
    from kdgqa.conversion.summary import allocation_lines, parameter_count
    from kdgqa.io.checkpoint import parse_size, save_pretrained
    from kdgqa.io.durable import write_new_dir
    from kdgqa.io.export import export_mha
    from kdgqa.io.export_native import export_native
    from kdgqa.io.sources import load_model
    from kdgqa.models.locate import kv_cache_bytes_per_token
    from kdgqa.models.registry import family_of
    from kdgqa.schemes.registry import SCHEMES, scheme_class
    from kdgqa.study.calibration_images import check_calibration, load_calibration

    cls = scheme_class(args.scheme)
    parse_size(args.max_shard_size)
    options = dict(args.option)
    if "calibration" in options:
        raise KdgqaError("pass calibration images with --calibration SPEC, not --option")
    data_pooling = args.align or args.pooling in DATA_POOLING
    needs = cls.needs_calibration or data_pooling
    if needs and args.calibration is None:
        why = (f"scheme {args.scheme!r}" if cls.needs_calibration else
               "--align" if args.align else f"--pooling {args.pooling}")
        raise KdgqaError(f"{why} needs --calibration SPEC (images to measure the layers on)")
    if not needs and args.calibration is not None:
        raise KdgqaError(f"--calibration is only used by schemes "
                         f"{', '.join(n for n, c in SCHEMES.items() if c.needs_calibration)}, "
                         f"by --pooling {', '.join(DATA_POOLING)} and by --align")
    if args.calibration is not None:
        check_calibration(args.calibration)
    if args.calibration_images is not None:
        if args.calibration_images < 1:
            raise KdgqaError(f"--calibration-images must be >= 1, got {args.calibration_images}")
        options["calibration_images"] = args.calibration_images
    model = load_model(args.model, arch=args.arch, model_kwargs=dict(args.model_arg) or None)
    params_before = parameter_count(model)
    dtype = next(model.parameters()).dtype
    kv_before = kv_cache_bytes_per_token(model, dtype)
    extra: dict[str, Any] = {}
    calibration_lines: list[str] = []
    if needs:
        family = family_of(model)
        if family is None:
            raise KdgqaError(f"cannot tell the inputs of a {type(model).__name__} for "
                             "--calibration")
        geometry = family.input_geometry(model)
        mean = args.calibration_mean or geometry.mean
        std = args.calibration_std or geometry.std
        default = (cls.option_defaults["calibration_images"] if cls.needs_calibration else
                   FIT_CALIBRATION_IMAGES)
        count = options.get("calibration_images", default)
        images = load_calibration(args.calibration, count, image_size=geometry.image_size,
                                  channels=geometry.channels, mean=mean, std=std)
        extra["calibration"] = images
        calibration_lines.append(
            f"calibration: {images.shape[0]} images from {args.calibration} at "
            f"{geometry.image_size} px, normalised with mean {mean} std {std}")
    convert(model, args.scheme, args.kv_heads, pooling=args.pooling, align=args.align,
            attention_pool=args.attention_pool, **options, **extra)
    model.eval()
    kv_after = kv_cache_bytes_per_token(model, dtype)
    if args.format == "mha":
        write_new_dir(args.out, lambda d: export_mha(model, d), overwrite=args.overwrite)
    elif args.format == "native":
        write_new_dir(args.out, lambda d: export_native(model, d), overwrite=args.overwrite)
    else:
        write_new_dir(args.out, lambda d: save_pretrained(model, d, args.max_shard_size),
                      overwrite=args.overwrite)
    params_after = parameter_count(model)
    dtype_name = str(dtype).removeprefix("torch.")
    grouped = (f"{params_before:,} -> {params_after:,} ({params_after - params_before:+,}) "
               f"parameters; KV-cache bytes per token ({dtype_name}, all layers) "
               f"{kv_before:,} -> {kv_after:,}")
    if args.format == "mha":
        held = [f"the file holds a plain MHA model: {params_before:,} parameters, KV cache "
                f"{kv_before:,} bytes per token ({dtype_name}), every query head with its own "
                "copy of the K/V head it reads; it loads without kdgqa and computes what the "
                "grouped model computes",
                f"as a kdgqa model it would be {grouped}"]
    elif args.format == "native":
        held = [f"the file holds a native timm GQA model (Eva with num_kv_heads): {grouped}; "
                "it loads with timm alone (timm.create_model('local-dir:DIR', "
                "pretrained=True))"]
    else:
        held = [f"the file holds the grouped model: {grouped}"]
    lines = [
        f"converted {args.model} -> {args.out} ({args.format}): scheme {args.scheme}, "
        f"{args.kv_heads} KV heads, pooling {args.pooling}" + (", heads aligned" if args.align
                                                                else ""),
        *held,
        *calibration_lines,
        "allocation per layer:",
        *allocation_lines(model),
    ]
    print("\n".join(lines))
    return 0
