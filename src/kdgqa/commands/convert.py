"""``kdgqa convert``: pretrained MHA model -> grouped-query model directory, with a summary."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    from kdgqa.convert import POOLING_METHODS

    parser.add_argument("--model", required=True, metavar="SRC",
                        help="timm:NAME, a timm checkpoint file, or a HF/timm/kdgqa directory")
    parser.add_argument("--scheme", required=True, help="mha, mqa, gqa, pgqa, kdgqa, dgqa-ema, "
                        "dgqa-diff, kdgqa-ps, calibrated, similarity")
    parser.add_argument("--kv-heads", required=True, type=int, metavar="G",
                        help="number of KV heads per layer")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--pooling", default="mean", choices=POOLING_METHODS,
                        help="how K/V heads start (default: mean of each group)")
    parser.add_argument("--option", action="append", type=_key_value, default=[],
                        metavar="KEY=VALUE", help="scheme option, e.g. window_size=300")
    parser.add_argument("--calibration", default=None, metavar="SPEC",
                        help="images that choose the groups of calibrated/similarity: "
                        "NAME:ROOT (imagefolder, tiny-imagenet, cifar10, cifar100, food101) "
                        "or an image folder")
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
    parser.add_argument("--format", choices=("kdgqa", "mha"), default="kdgqa",
                        help="kdgqa checkpoint (default) or a plain MHA export (static schemes)")
    parser.add_argument("--max-shard-size", default="10GB", help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kv_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """KV-cache bytes per token summed over layers: (as MHA, as converted)."""
    from kdgqa.convert import iter_grouped

    size = torch.empty((), dtype=dtype).element_size()
    before = after = 0
    for _, module in iter_grouped(model):
        before += 2 * module.num_heads * module.head_dim * size
        after += module.kv_cache_bytes_per_token(dtype)
    return before, after


def _allocation(model: nn.Module) -> list[str]:
    from kdgqa.convert import iter_grouped
    from kdgqa.export import ExportError, fixed_kv_index

    lines = []
    for path, module in iter_grouped(model):
        try:
            index = fixed_kv_index(module, path)
        except ExportError:
            lines.append(f"  {path}: dynamic (chosen from the keys)")
            continue
        counts = torch.bincount(index, minlength=module.num_kv_heads).tolist()
        line = f"  {path}: query heads per KV head {counts}"
        groups = getattr(module.allocator, "groups", None)
        if groups is not None:
            line += " from original heads " + " ".join(
                "{" + ",".join(map(str, g)) + "}" for g in groups())
        lines.append(line)
    return lines


def _input_geometry(model: nn.Module) -> tuple[int, int, list[float], list[float]]:
    """Channels, square image size, mean and std the model's inputs are expected with."""
    any_model: Any = model
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "image_size"):
        size = config.image_size
        channels = int(getattr(config, "num_channels", 3))
        mean: Any = None
        std: Any = None
    else:
        patch_embed = getattr(any_model, "patch_embed", None)
        if patch_embed is None or getattr(patch_embed, "img_size", None) is None:
            raise ValueError("cannot tell the model's input size for --calibration")
        size = patch_embed.img_size
        channels = int(patch_embed.proj.in_channels)
        cfg = getattr(any_model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return channels, size, list(mean or [0.5]), list(std or [0.5])


def _calibration(args: argparse.Namespace, model: nn.Module) -> tuple[Any, str]:
    """The calibration images for ``args`` and a summary line."""
    from kdgqa.calibration_data import load_calibration
    from kdgqa.schemes import SCHEMES

    count = args.calibration_images
    if count is None:
        count = SCHEMES[args.scheme].option_defaults["calibration_images"]
    channels, size, mean, std = _input_geometry(model)
    mean = args.calibration_mean or mean
    std = args.calibration_std or std
    images = load_calibration(args.calibration, count, image_size=size, channels=channels,
                              mean=mean, std=std)
    line = (f"calibration: {images.shape[0]} images from {args.calibration} at {size} px, "
            f"normalised with mean {mean} std {std}")
    return images, line


def _write_atomically(out: Path, overwrite: bool, write: Callable[[Path], Any]) -> None:
    """Write into a temporary sibling of ``out`` and rename it into place on success."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"output directory {str(out)!r} exists and is not empty "
                         "(use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory")
    from kdgqa.durable import replace_dir

    replace_dir(out, write)


def run(args: argparse.Namespace) -> int:
    from kdgqa.checkpoint import parse_size, save_pretrained
    from kdgqa.convert import convert
    from kdgqa.export import export_mha
    from kdgqa.schemes import SCHEMES, available_schemes
    from kdgqa.sources import load_model

    if args.scheme not in available_schemes():
        raise ValueError(f"unknown scheme {args.scheme!r}; valid schemes: "
                         f"{', '.join(available_schemes())}")
    parse_size(args.max_shard_size)
    options = dict(args.option)
    if "calibration" in options:
        raise ValueError("pass calibration images with --calibration SPEC, not --option")
    needs = SCHEMES[args.scheme].needs_calibration
    if needs and args.calibration is None:
        raise ValueError(f"scheme {args.scheme!r} needs --calibration SPEC (images that "
                         "choose its groups)")
    if not needs and args.calibration is not None:
        raise ValueError(f"--calibration is only used by schemes "
                         f"{', '.join(n for n, c in SCHEMES.items() if c.needs_calibration)}")
    if args.calibration is not None:
        from kdgqa.calibration_data import check_calibration

        check_calibration(args.calibration)
    if args.calibration_images is not None:
        if args.calibration_images < 1:
            raise ValueError(f"--calibration-images must be >= 1, got {args.calibration_images}")
        options["calibration_images"] = args.calibration_images
    model = load_model(args.model, arch=args.arch, model_kwargs=dict(args.model_arg) or None)
    params_before = _params(model)
    extra: dict[str, Any] = {}
    calibration_line: list[str] = []
    if needs:
        extra["calibration"], line = _calibration(args, model)
        calibration_line.append(line)
    convert(model, args.scheme, args.kv_heads, pooling=args.pooling, **options, **extra)
    model.eval()
    dtype = next(model.parameters()).dtype
    kv_before, kv_after = _kv_bytes(model, dtype)
    if args.format == "mha":
        _write_atomically(Path(args.out), args.overwrite, lambda d: export_mha(model, d))
    else:
        _write_atomically(Path(args.out), args.overwrite,
                          lambda d: save_pretrained(model, d, args.max_shard_size))
    params_after = _params(model)
    lines = [
        f"converted {args.model} -> {args.out} ({args.format}): scheme {args.scheme}, "
        f"{args.kv_heads} KV heads, pooling {args.pooling}",
        f"parameters: {params_before:,} -> {params_after:,} "
        f"({params_after - params_before:+,})",
        f"KV-cache bytes per token ({str(dtype).removeprefix('torch.')}, all layers): "
        f"{kv_before:,} -> {kv_after:,}",
        *calibration_line,
        "allocation per layer:",
        *_allocation(model),
    ]
    print("\n".join(lines))
    return 0
