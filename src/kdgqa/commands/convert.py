"""``kdgqa convert``: pretrained MHA model -> grouped-query model directory, with a summary."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kdgqa.convert import POOLING_METHODS

    parser.add_argument("--model", required=True, metavar="SRC",
                        help="timm:NAME, a timm checkpoint file, or a HF/timm/kdgqa directory")
    parser.add_argument("--scheme", required=True, help="mha, mqa, gqa, pgqa, kdgqa, dgqa-ema, "
                        "dgqa-diff")
    parser.add_argument("--kv-heads", required=True, type=int, metavar="G",
                        help="number of KV heads per layer")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--pooling", default="mean", choices=POOLING_METHODS,
                        help="how K/V heads start (default: mean of each group)")
    parser.add_argument("--option", action="append", type=_key_value, default=[],
                        metavar="KEY=VALUE", help="scheme option, e.g. window_size=300")
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
        lines.append(f"  {path}: query heads per KV head {counts}")
    return lines


def _write_atomically(out: Path, overwrite: bool, write: Callable[[Path], Any]) -> None:
    """Write into a temporary sibling of ``out`` and rename it into place on success."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"output directory {str(out)!r} exists and is not empty "
                         "(use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "dir")
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(args: argparse.Namespace) -> int:
    from kdgqa.checkpoint import parse_size, save_pretrained
    from kdgqa.convert import convert
    from kdgqa.export import export_mha
    from kdgqa.schemes import available_schemes
    from kdgqa.sources import load_model

    if args.scheme not in available_schemes():
        raise ValueError(f"unknown scheme {args.scheme!r}; valid schemes: "
                         f"{', '.join(available_schemes())}")
    parse_size(args.max_shard_size)
    model = load_model(args.model, arch=args.arch, model_kwargs=dict(args.model_arg) or None)
    params_before = _params(model)
    convert(model, args.scheme, args.kv_heads, pooling=args.pooling, **dict(args.option))
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
        "allocation per layer:",
        *_allocation(model),
    ]
    print("\n".join(lines))
    return 0
