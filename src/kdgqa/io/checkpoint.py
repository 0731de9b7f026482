"""Save a (converted) model as safetensors + JSON + checksums, and load it back offline.

Directory layout written by :func:`save_pretrained`::

    kdgqa_config.json              base architecture, conversion settings, library versions
    model.safetensors              or model-00001-of-0000N.safetensors ... when sharded,
    model.safetensors.index.json   with this index (transformers' format) mapping keys to files
    checksums.sha256               ``sha256sum``-compatible lines for every weight/index file
                                   and the config (written last)

:func:`load` rebuilds the base model from the config (no network, no pretrained download),
converts it with the recorded settings, verifies every checksum and loads the tensors,
allocator state (DGQA step, cache, counts) included.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdgqa.conversion.converter import RECORDED, convert
from kdgqa.conversion.options import DATA_POOLING
from kdgqa.errors import CheckpointError
from kdgqa.io.base import base_spec, build_base
from kdgqa.io.weights import load_weights, write_safetensors

__all__ = [
    "CHECKSUMS_NAME",
    "CONFIG_NAME",
    "CheckpointError",
    "load",
    "parse_size",
    "read_config",
    "save_pretrained",
    "verify",
]

CONFIG_NAME = "kdgqa_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CHECKSUMS_NAME = "checksums.sha256"
FORMAT_VERSION = 1
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GiB"`` (KB = 1000, KiB = 1024)."""
    if isinstance(size, bool):
        raise CheckpointError(f"max_shard_size must be bytes or a size like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise CheckpointError(
                f"max_shard_size must be bytes or a size like '5GB' or '500MiB', got {size!r}"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


def _versions() -> dict[str, str]:
    out: dict[str, str] = {"torch": str(torch.__version__)}
    for name in ("kdgqa", "timm", "transformers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shards(
    tensors: dict[str, torch.Tensor], max_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Split in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > max_bytes:
            shards.append({})
            used = 0
        shards[-1][key] = tensor
        used += size
    return shards


def conversion_of(model: nn.Module) -> dict[str, Any] | None:
    """The conversion settings recorded by :func:`kdgqa.convert`, if any."""
    conversion = getattr(model, "kdgqa_conversion", None)
    if conversion is None:
        return None
    keys = ("scheme", "num_kv_heads", "num_heads", "pooling", "scheme_options")
    out = {k: conversion[k] for k in keys}
    if conversion.get("align"):
        out["align"] = True
    if conversion.get("attention_pool", "keep") != "keep":  # older records stay as they were
        out["attention_pool"] = conversion["attention_pool"]
    return out


def save_pretrained(
    model: nn.Module, directory: str | Path, max_shard_size: int | str = "10GB"
) -> Path:
    """Write ``model`` to ``directory`` (created if needed) so :func:`load` can rebuild it.

    Raises :class:`~kdgqa.errors.CheckpointError`/``SourceError`` when the base architecture
    cannot be recorded. Existing files of a previous checkpoint in ``directory`` are replaced.
    """
    limit = parse_size(max_shard_size)
    spec = base_spec(model)
    conversion = conversion_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (*directory.glob("model*.safetensors"), directory / INDEX_NAME):
        stale.unlink(missing_ok=True)

    tensors = {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in model.state_dict().items()
    }
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    shards = _shards(tensors, limit)
    written: list[str] = []
    if len(shards) == 1:
        write_safetensors(shards[0], directory / WEIGHTS_NAME)
        written.append(WEIGHTS_NAME)
    else:
        weight_map: dict[str, str] = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, directory / name)
            written.append(name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(INDEX_NAME)

    config = {
        "format": "kdgqa",
        "format_version": FORMAT_VERSION,
        "base": spec,
        "conversion": conversion,
        "dtypes": dtypes,
        "versions": _versions(),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    written.append(CONFIG_NAME)
    lines = [f"{_sha256(directory / name)}  {name}\n" for name in written]
    (directory / CHECKSUMS_NAME).write_text("".join(lines))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``kdgqa_config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a kdgqa checkpoint: no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(config, dict) or config.get("format") != "kdgqa":
        raise CheckpointError(f"{str(path)!r} is not a kdgqa config")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format_version {config.get('format_version')!r}; this kdgqa "
            f"reads version {FORMAT_VERSION}"
        )
    conversion = config.get("conversion")
    if not isinstance(config.get("base"), dict) or not (conversion is None or (
        isinstance(conversion, dict) and isinstance(conversion.get("scheme"), str)
        and isinstance(conversion.get("num_kv_heads"), int)
        and isinstance(conversion.get("scheme_options", {}), dict)
    )):
        raise CheckpointError(f"{str(path)!r} is malformed: 'base' must be a mapping and "
                              "'conversion' null or a mapping with scheme and num_kv_heads")
    return config


def _verified_weight_files(directory: Path) -> list[Path]:
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} has no {CHECKSUMS_NAME}")
    expected: dict[str, str] = {}
    try:
        text = path.read_text()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {str(path)!r}: {error}") from None
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name or "/" in name:
            raise CheckpointError(f"malformed line in {str(path)!r}: {line!r}")
        expected[name] = digest

    def check(name: str, what: str) -> None:
        file = directory / name
        if name not in expected:
            raise CheckpointError(f"{what} {name!r} in {str(directory)!r} has no checksum")
        if not file.is_file():
            raise CheckpointError(f"{what} {name!r} is missing from {str(directory)!r}")
        if _sha256(file) != expected[name]:
            raise CheckpointError(
                f"checksum mismatch for {name!r} in {str(directory)!r}: the file is corrupt "
                "or was modified"
            )

    if CONFIG_NAME in expected:  # checkpoints written before the config was checksummed lack it
        check(CONFIG_NAME, "config")
    if (directory / INDEX_NAME).is_file() or INDEX_NAME in expected:
        check(INDEX_NAME, "index")  # a checksummed index that is gone is named as missing
        try:
            index = json.loads((directory / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{INDEX_NAME} in {str(directory)!r} is malformed") from None
    else:
        names = [WEIGHTS_NAME]
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name:
            raise CheckpointError(f"{INDEX_NAME} in {str(directory)!r} names a bad file {name!r}")
        check(name, "weight file")
    return [directory / name for name in names]


def verify(directory: str | Path) -> dict[str, Any]:
    """Check a checkpoint directory's config and every checksum without building the model.

    Returns the config; raises :class:`CheckpointError` naming the first problem.
    """
    config = read_config(directory)
    _verified_weight_files(Path(directory))
    return config


def load(directory: str | Path) -> nn.Module:
    """Rebuild the model saved by :func:`save_pretrained`, offline, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    files = _verified_weight_files(directory)
    model = build_base(config["base"])
    conversion = config.get("conversion")
    if conversion is not None:
        options = dict(conversion.get("scheme_options", {}))
        pooling = conversion.get("pooling", "mean")
        align = conversion.get("align", False)
        if align or pooling in DATA_POOLING:
            # The structure only: the fitted (and rotated) weights are in the state dict.
            options.setdefault("calibration", RECORDED)
        try:
            convert(model, conversion["scheme"], conversion["num_kv_heads"], pooling=pooling,
                    align=align, attention_pool=conversion.get("attention_pool", "keep"),
                    **options)
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"the conversion recorded in {str(directory)!r} cannot be "
                                  f"applied: {error}") from None
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state_dict.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read {str(file)!r}: {error}") from None
    load_weights(model, state_dict, repr(str(directory)), assign=True)
    return model.eval()
