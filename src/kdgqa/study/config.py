"""Typed experiment configuration, loaded from YAML and validated before anything runs.

A study is described by plain dataclasses (model, data, pretraining and uptraining recipes,
the scheme x KV-head x seed grid). Loading rejects unknown keys (suggesting the closest valid
one), wrong types and impossible values with one precise message, so a typo never becomes a
silently ignored setting after hours of training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

from kdgqa.conversion.options import POOLING_METHODS
from kdgqa.errors import ConfigError

if TYPE_CHECKING:
    from kdgqa.study.splits import SplitPlan

__all__ = [
    "DATASETS",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "GridConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "check_cells",
    "config_to_dict",
    "default_config",
    "describe_plan",
    "load_config",
    "parse_config",
    "read_yaml",
    "resolve_conversion",
    "resolve_scheme",
]

DATASETS = ("digits", "cifar10", "cifar100", "food101", "tiny-imagenet", "imagefolder")
#: Far above any ViT; keeps the per-head bookkeeping of a typo'd config from exhausting memory.
MAX_HEADS = 4096


@dataclass
class ModelConfig:
    """The MHA model to pretrain from scratch, or a pretrained one to start from.

    ``pretrained`` is a timm model name (weights fetched by timm when online) or a local
    checkpoint directory written by ``kdgqa.save_pretrained``; when set, the
    architecture fields are ignored and pretraining is usually skipped.
    """

    patch_size: int = 2
    embed_dim: int = 48
    depth: int = 4
    num_heads: int = 6
    mlp_ratio: float = 2.0
    drop_path_rate: float = 0.0
    pretrained: str | None = None


@dataclass
class DataConfig:
    """Which images, at what size, with which augmentation."""

    name: str = "digits"
    root: str | None = None
    image_size: int = 8
    val_fraction: float = 0.1
    #: Fraction of the data held out as test where the dataset has no test split (digits).
    test_fraction: float = 0.2
    randaugment: bool = False
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    #: Random crop after zero padding by this many pixels (0 disables).
    crop_padding: int = 0
    flip: bool = False
    mean: float = 0.5
    std: float = 0.5
    #: Download torchvision datasets when they are missing (needs network).
    download: bool = False
    #: Cap on training images (0 = all); handy for smoke runs on big datasets.
    limit_train: int = 0


@dataclass
class TrainConfig:
    """One training recipe: used for MHA pretraining and for uptraining each grid cell."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.05
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    #: Write a checkpoint every this many optimizer steps (0: only at the end).
    checkpoint_every: int = 0
    #: Evaluate on the validation split every this many epochs.
    eval_every: int = 1
    label_smoothing: float = 0.0
    #: Mixup and CutMix Beta alphas (0: off); each batch is mixed with probability
    #: ``mix_prob``, by one of the two at random when both are on (``kdgqa.study.mixing``).
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    compile: bool = False
    #: bf16 autocast; only takes effect on CUDA.
    amp: bool = True
    #: Stop when the loss is not finite or exceeds this multiple of the larger of its running
    #: mean and the run's starting loss (``kdgqa.study.divergence``).
    explode_factor: float = 20.0
    #: Record the query-head allocation of key-driven schemes every this many steps.
    allocation_every: int = 10
    #: Read losses on the host every this many steps (one sync each) rather than every step;
    #: results do not depend on it, a diverged step is reported up to this many steps late.
    sync_every: int = 32


@dataclass
class GridConfig:
    """The study's grid: every scheme at every KV-head count with every seed."""

    schemes: list[str] = field(
        default_factory=lambda: ["gqa", "kdgqa", "dgqa-ema", "dgqa-diff", "pgqa"]
    )
    kv_heads: list[int] = field(default_factory=lambda: [2, 3])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    #: Keyword options per scheme, e.g. ``{"dgqa-ema": {"window_size": 20}}``.
    scheme_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Named variants usable in ``schemes``: ``{"kdgqa-ref": {"scheme": "kdgqa",
    #: "reference": true}}``, so one grid can hold a scheme in several forms. A variant
    #: inherits its scheme's ``scheme_options`` and overrides them with its own.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: How K/V projections of each group are pooled when converting (``fit`` measures
    #: the first training images; see ``kdgqa.conversion.fit``). A variant may set its own
    #: ``pooling`` and ``align``.
    pooling: str = "mean"
    #: Rotate every head into its group's common basis before pooling (same function).
    align: bool = False
    #: Steps of layer-wise distillation of the shared K/V after converting (0: none; see
    #: ``kdgqa.conversion.distill``), on the first training images; a variant may set its own.
    distill_steps: int = 0
    #: Also uptrain the unconverted MHA model with the same recipe, as a reference row.
    include_mha: bool = True


@dataclass
class ExperimentConfig:
    """A whole study: optional MHA pretraining, then convert -> uptrain -> evaluate per cell."""

    name: str = "digits-default"
    output_dir: str = "runs/digits-default"
    device: str = "auto"
    #: Intra-op CPU threads for training on the CPU; 0 chooses (one thread for small models,
    #: which is fastest and bitwise reproducible; see ``kdgqa.study.cpu``).
    cpu_threads: int = 0
    #: Worker processes that run the grid on the CPU; 0 chooses (one more than the cores for
    #: a small model on one thread; see ``kdgqa.study.cpu``), 1 runs it in this process.
    cpu_workers: int = 0
    #: What every grid run does with the MHA model's classifier before it is converted:
    #: ``keep`` it (in-domain uptraining, the GQA paper's protocol: accuracy right after
    #: conversion is then meaningful), ``reset`` it to a new one drawn with the run's seed
    #: (transfer to another task), or ``auto``: keep it when the label space is the same
    #: (same classes as the pretraining data, or as many as a pretrained model predicts).
    classifier: Literal["auto", "keep", "reset"] = "auto"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig | None = None
    #: Data for MHA pretraining when it differs from ``data`` (e.g. Tiny ImageNet, then
    #: CIFAR-10); see ``classifier`` for what happens to the classifier then.
    pretrain_data: DataConfig | None = None
    uptrain: TrainConfig = field(default_factory=TrainConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    #: Show progress bars (they go to stderr and switch off when it is not a terminal).
    progress: bool = True


def default_config() -> ExperimentConfig:
    """The embedded default study: digits, MHA pretraining from scratch, every scheme.

    Sized to finish well within three minutes on two CPU cores: a small but real study
    (a 4-layer, 6-head ViT on 8x8 digits; pretraining reaches about 95 % test accuracy).
    """
    return ExperimentConfig(
        pretrain=TrainConfig(
            epochs=40, batch_size=64, lr=3e-3, weight_decay=0.05, schedule="cosine",
            warmup_steps=20, allocation_every=0,
        ),
        uptrain=TrainConfig(
            epochs=5, batch_size=64, lr=5e-4, weight_decay=0.05, schedule="constant",
            allocation_every=4,
        ),
        data=DataConfig(),
        grid=GridConfig(
            scheme_options={"dgqa-ema": {"window_size": 10}, "dgqa-diff": {"window_size": 10}},
        ),
    )


# --------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(
                f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}{hint}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {
            _convert(k, key_tp, where): _convert(v, val_tp, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # programming error


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            valid = ", ".join(names)
            raise ConfigError(
                f"unknown key {path!r}{_suggest(str(key), names)}; valid keys here: {valid}"
            )
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def parse_config(
    raw: dict[str, Any] | None, base: ExperimentConfig | None = None
) -> ExperimentConfig:
    """Build and validate a config from a mapping; keys not given keep the defaults.

    Sections present in ``raw`` are merged over ``base`` (default: ``default_config()``), so
    a YAML file only needs the values it changes. ``pretrain: null`` disables pretraining.
    """
    base_dict = config_to_dict(base or default_config())
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping at the top level, got {raw!r}")
    merged = _merge(base_dict, raw)
    config: ExperimentConfig = _build(ExperimentConfig, merged, "")
    validate(config)
    return config


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if (
            isinstance(value, dict) and isinstance(out.get(key), dict)
            and key not in ("scheme_options", "variants")
        ):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and out.get(key) is None and key == "pretrain":
            out[key] = _merge(config_to_dict(TrainConfig()), value)
        elif isinstance(value, dict) and out.get(key) is None and key == "pretrain_data":
            out[key] = _merge(config_to_dict(DataConfig()), value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with ``KEY.PATH=VALUE`` settings applied (VALUE read as YAML), e.g.
    ``uptrain.lr=3e-4`` or ``grid.kv_heads=[1]``: tuning sweeps without a file per point."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. uptrain.lr=3e-4")
        try:
            value = read_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 as a string; on a command line it means the number.
            with contextlib.suppress(ValueError):
                value = float(value) if value.strip().lower() not in ("nan", "inf") else value
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a config has no use for ``*name``, and nested aliases expand
    exponentially (a few hundred bytes can hold gigabytes)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not accepted in configs "
                              f"(line {event.start_mark.line + 1}); write the value out")
        return super().compose_node(parent, index)


def read_yaml(text: str) -> Any:
    """``text`` parsed as YAML (safe types only, no aliases)."""
    return yaml.load(text, Loader=_NoAliasLoader)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (or the embedded default when ``path`` is None), apply
    ``overrides`` (see :func:`apply_overrides`) and validate it."""
    if path is None:
        return parse_config(apply_overrides({}, overrides or []))
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from None
    try:
        raw = read_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty; expected a YAML mapping of the "
                          "settings to change (e.g. configs/digits.yaml), or run without a "
                          "config for the built-in digits study")
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping at the top level")
        raw = apply_overrides(raw, overrides)
    return parse_config(raw)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config, for YAML/JSON output and merging."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- validation

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_recipe(name: str, r: TrainConfig) -> None:
    _require(r.epochs >= 1, f"{name}.epochs must be >= 1, got {r.epochs}")
    _require(r.batch_size >= 1, f"{name}.batch_size must be >= 1, got {r.batch_size}")
    _require(r.lr > 0, f"{name}.lr must be > 0, got {r.lr}")
    _require(r.weight_decay >= 0, f"{name}.weight_decay must be >= 0, got {r.weight_decay}")
    _require(r.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0, got {r.warmup_steps}")
    _require(r.grad_clip >= 0, f"{name}.grad_clip must be >= 0 (0 disables), got {r.grad_clip}")
    _require(r.checkpoint_every >= 0,
             f"{name}.checkpoint_every must be >= 0 (0: only at the end), got {r.checkpoint_every}")
    _require(r.eval_every >= 1, f"{name}.eval_every must be >= 1, got {r.eval_every}")
    _require(0 <= r.label_smoothing < 1,
             f"{name}.label_smoothing must be in [0, 1), got {r.label_smoothing}")
    _require(r.explode_factor > 1, f"{name}.explode_factor must be > 1, got {r.explode_factor}")
    for key in ("mixup", "cutmix"):
        _require(0 <= getattr(r, key) <= 10,
                 f"{name}.{key} must be in [0, 10] (a Beta alpha; 0 is off), got "
                 f"{getattr(r, key)}")
    _require(0 <= r.mix_prob <= 1, f"{name}.mix_prob must be in [0, 1], got {r.mix_prob}")
    _require(r.sync_every >= 1, f"{name}.sync_every must be >= 1, got {r.sync_every}")
    _require(r.allocation_every >= 0,
             f"{name}.allocation_every must be >= 0 (0 disables), got {r.allocation_every}")


def _check_data(prefix: str, d: DataConfig) -> None:
    _require(d.name in DATASETS,
             f"{prefix}.name must be one of {', '.join(DATASETS)}, got {d.name!r}"
             f"{_suggest(d.name, list(DATASETS))}")
    _require(d.name in ("digits", "cifar10", "cifar100", "food101") or d.root is not None,
             f"{prefix}.root is required for {prefix}.name={d.name!r}")
    _require(d.image_size >= 1, f"{prefix}.image_size must be >= 1, got {d.image_size}")
    _require(0 < d.val_fraction < 1,
             f"{prefix}.val_fraction must be in (0, 1), got {d.val_fraction}")
    _require(0 < d.test_fraction < 1,
             f"{prefix}.test_fraction must be in (0, 1), got {d.test_fraction}")
    _require(d.val_fraction + d.test_fraction < 1,
             f"{prefix}.val_fraction + {prefix}.test_fraction must be < 1")
    _require(d.randaugment_ops >= 0,
             f"{prefix}.randaugment_ops must be >= 0, got {d.randaugment_ops}")
    _require(0 <= d.randaugment_magnitude <= 30,
             f"{prefix}.randaugment_magnitude must be in [0, 30], got {d.randaugment_magnitude}")
    _require(d.crop_padding >= 0, f"{prefix}.crop_padding must be >= 0, got {d.crop_padding}")
    _require(d.std > 0, f"{prefix}.std must be > 0, got {d.std}")
    _require(d.limit_train >= 0, f"{prefix}.limit_train must be >= 0, got {d.limit_train}")


def validate(config: ExperimentConfig) -> None:
    """Check values and their combinations; raise ``ConfigError`` naming the first problem."""
    # Imported here, not above: reading and printing configs (the CLI's help) needs no torch.
    from kdgqa.schemes.registry import SCHEMES

    m, d, g = config.model, config.data, config.grid
    _require(re.fullmatch(r"auto|(cpu|cuda|mps)(:\d+)?", config.device) is not None,
             f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {config.device!r}")
    for where, seed in (("seed", config.seed), *(("grid.seeds", s) for s in g.seeds)):
        _require(0 <= seed < 2**32, f"{where}: seeds must be in [0, 2**32), got {seed}")
    _require(bool(config.output_dir), "output_dir must not be empty")
    _require(0 <= config.cpu_threads <= 1024,
             f"cpu_threads must be in [0, 1024] (0 chooses), got {config.cpu_threads}")
    _require(0 <= config.cpu_workers <= 1024,
             f"cpu_workers must be in [0, 1024] (0 chooses), got {config.cpu_workers}")
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(m, key)
        _require(value >= 1, f"model.{key} must be >= 1, got {value}")
    _require(m.num_heads <= MAX_HEADS, f"model.num_heads must be <= {MAX_HEADS}, got "
             f"{m.num_heads}")
    _require(m.embed_dim % m.num_heads == 0,
             f"model.embed_dim={m.embed_dim} must be divisible by model.num_heads={m.num_heads}")
    _require(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    _require(0 <= m.drop_path_rate < 1,
             f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    if m.pretrained is None:
        _require(d.image_size % m.patch_size == 0,
                 f"data.image_size={d.image_size} must be divisible by "
                 f"model.patch_size={m.patch_size}")

    _check_data("data", d)
    if config.pretrain_data is not None:
        _check_data("pretrain_data", config.pretrain_data)
        _require(config.pretrain is not None,
                 "pretrain_data is set but pretrain is null; add a pretrain recipe")
        _require(config.pretrain_data.image_size == d.image_size,
                 f"pretrain_data.image_size={config.pretrain_data.image_size} must equal "
                 f"data.image_size={d.image_size} (the position embeddings are shared)")

    if config.pretrain is not None:
        _check_recipe("pretrain", config.pretrain)
    _check_recipe("uptrain", config.uptrain)

    _require(len(g.schemes) > 0, "grid.schemes must not be empty")
    _require(len(g.kv_heads) > 0, "grid.kv_heads must not be empty")
    _require(len(g.seeds) > 0, "grid.seeds must not be empty")
    for what, values in (("schemes", g.schemes), ("kv_heads", g.kv_heads), ("seeds", g.seeds)):
        _require(len(set(values)) == len(values), f"grid.{what} has duplicates: {values}")
    for label, spec in g.variants.items():
        _require(label not in SCHEMES,
                 f"grid.variants: {label!r} is already a scheme name; pick another label")
        base = spec.get("scheme")
        _require(isinstance(base, str) and base in SCHEMES,
                 f"grid.variants.{label}.scheme must name a scheme ({', '.join(SCHEMES)}), "
                 f"got {base!r}{_suggest(str(base), list(SCHEMES))}")
        pooling = spec.get("pooling", g.pooling)
        _require(pooling in POOLING_METHODS,
                 f"grid.variants.{label}.pooling must be one of {', '.join(POOLING_METHODS)}, "
                 f"got {pooling!r}")
        _require(isinstance(spec.get("align", False), bool),
                 f"grid.variants.{label}.align must be true or false, got {spec.get('align')!r}")
        steps = spec.get("distill_steps", 0)
        _require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
                 f"grid.variants.{label}.distill_steps must be an integer >= 0, got {steps!r}")
    names = [*SCHEMES, *g.variants]
    for scheme in [*g.schemes, *g.scheme_options]:
        _require(scheme in names,
                 f"grid: unknown scheme {scheme!r}{_suggest(scheme, names)}; "
                 f"valid schemes: {', '.join(names)}")
    _require(g.distill_steps >= 0, f"grid.distill_steps must be >= 0, got {g.distill_steps}")
    _require(g.pooling in POOLING_METHODS,
             f"grid.pooling must be one of {', '.join(POOLING_METHODS)}, got {g.pooling!r}")
    if m.pretrained is None:
        heads = m.num_heads
        for kv in g.kv_heads:
            _require(1 <= kv <= heads,
                     f"grid.kv_heads: {kv} does not fit model.num_heads={heads}; "
                     f"expected 1 <= G <= {heads}")
        check_cells(config, heads)


def check_cells(config: ExperimentConfig, num_heads: int, what: str = "") -> None:
    """Check every grid cell against ``num_heads`` query heads, as building it would."""
    from kdgqa.schemes.registry import validate_cell

    for label in config.grid.schemes:
        scheme, options = resolve_scheme(config.grid, label)
        for kv in config.grid.kv_heads:
            try:
                validate_cell(scheme, num_heads, kv, options)
            except ValueError as exc:
                raise ConfigError(f"grid cell {label} G={kv}{what}: {exc}") from None


#: Variant keys that are conversion settings, not scheme options.
CONVERSION_KEYS = ("pooling", "align", "distill_steps")


def resolve_scheme(grid: GridConfig, label: str) -> tuple[str, dict[str, Any]]:
    """The registered scheme behind a grid label and the options it is built with."""
    variant = dict(grid.variants.get(label, {}))
    scheme = str(variant.pop("scheme", label))
    for key in CONVERSION_KEYS:
        variant.pop(key, None)
    options = {**grid.scheme_options.get(scheme, {}), **variant}
    if label != scheme:
        options.update(grid.scheme_options.get(label, {}))
    return scheme, options


def resolve_conversion(grid: GridConfig, label: str) -> dict[str, Any]:
    """``pooling``, ``align`` and ``distill_steps`` for a grid label: the variant's own, else
    the grid's."""
    variant = grid.variants.get(label, {})
    return {"pooling": variant.get("pooling", grid.pooling),
            "align": bool(variant.get("align", grid.align)),
            "distill_steps": int(variant.get("distill_steps", grid.distill_steps))}


# --------------------------------------------------------------------------- plan

def _steps_per_epoch(train_images: int | None, batch: int) -> str:
    if train_images is None:
        return "?"
    # Training drops the last partial batch whenever a whole one fits.
    return str(train_images // batch if train_images >= batch else 1)


def grid_labels_in_use(grid: GridConfig) -> set[str]:
    """Every scheme name and variant label the grid's cells are built from."""
    used = set(grid.schemes)
    used |= {str(grid.variants[label].get("scheme")) for label in grid.schemes
             if label in grid.variants}
    return used


def describe_plan(config: ExperimentConfig, data_plan: SplitPlan | None = None,
                  pretrain_plan: SplitPlan | None = None) -> str:
    """Human-readable plan of what ``run_experiment`` would do, for ``--dry-run``; the split
    sizes come from :func:`kdgqa.study.data.plan_splits` when given."""
    m, d, g = config.model, config.data, config.grid
    lines = [f"experiment {config.name!r} -> {config.output_dir} (device: {config.device}, "
             f"cpu threads: {config.cpu_threads or 'automatic'})"]
    aug = [
        name for name, on in (
            (f"randaugment(n={d.randaugment_ops}, m={d.randaugment_magnitude})", d.randaugment),
            (f"crop(pad={d.crop_padding})", d.crop_padding > 0),
            ("flip", d.flip),
        ) if on
    ]
    splits = data_plan.describe() if data_plan is not None else (
        f"{d.name} from {d.root or 'its default location'}")
    lines.append(f"data: {splits}; {d.image_size}px, augmentation: {', '.join(aug) or 'none'}")
    if config.pretrain_data is not None:
        p = config.pretrain_data
        splits = pretrain_plan.describe() if pretrain_plan is not None else (
            f"{p.name} from {p.root or 'its default location'}")
        lines.append(f"pretrain data: {splits}; {p.image_size}px")
    if m.pretrained:
        lines.append(f"model: pretrained {m.pretrained!r}")
    else:
        lines.append(f"model: ViT patch {m.patch_size}, dim {m.embed_dim}, depth {m.depth}, "
                     f"{m.num_heads} heads, mlp ratio {m.mlp_ratio}")
    pre = pretrain_plan if config.pretrain_data is not None else data_plan
    for name, r, plan in (("pretrain", config.pretrain, pre),
                          ("uptrain", config.uptrain, data_plan)):
        if r is None:
            lines.append(f"{name}: skipped")
            continue
        images = None if plan is None else plan.train
        lines.append(
            f"{name}: {r.epochs} epochs x {_steps_per_epoch(images, r.batch_size)} steps, "
            f"batch {r.batch_size}, AdamW lr {r.lr:g} wd {r.weight_decay:g}, {r.schedule}"
            f" (warmup {r.warmup_steps}), clip {r.grad_clip:g}"
            f"{', compile' if r.compile else ''}"
        )
    cells = len(g.schemes) * len(g.kv_heads) * len(g.seeds)
    extra = len(g.seeds) if g.include_mha else 0
    lines.append(
        f"grid: {len(g.schemes)} schemes x {len(g.kv_heads)} KV-head counts x "
        f"{len(g.seeds)} seeds = {cells} runs"
        + (f" (+{extra} MHA reference runs)" if extra else "")
    )
    lines.append(f"  schemes: {', '.join(g.schemes)}; kv_heads: {g.kv_heads}; seeds: {g.seeds}")
    used = grid_labels_in_use(g)
    for scheme, opts in g.scheme_options.items():
        if scheme in used:
            lines.append(f"  {scheme} options: {opts}")
    for label, spec in g.variants.items():
        if label in g.schemes:
            lines.append(f"  variant {label}: {spec}")
    return "\n".join(lines)
