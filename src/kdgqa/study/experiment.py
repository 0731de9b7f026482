"""A whole study: pretrain MHA once, then convert -> uptrain -> evaluate every grid cell.

Everything is checked before the output directory is created (config, dataset layout, KV
heads against the model), so a bad study leaves nothing behind. Results are appended to
``results.jsonl`` one run at a time, so an interrupted study resumes where it stopped
(``resume=True``): finished runs are skipped, the run in progress continues from its last
checkpoint. The report (:mod:`kdgqa.study.report`) is rebuilt from those files at the end.

Run layout::

    OUT/config.yaml  meta.json  results.jsonl  allocation.jsonl  history.jsonl
    OUT/pretrain/    (training checkpoints, model/ as kdgqa.save_pretrained)
    OUT/runs/<scheme>-g<G>-s<seed>/   (checkpoint.pt, best.pt)
    OUT/report.md  summary.csv  runs.csv  *.png
"""

from __future__ import annotations

import contextlib
import json
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdgqa.conversion.summary import parameter_count
from kdgqa.errors import ConfigError, ConversionError
from kdgqa.io.checkpoint import load, save_pretrained
from kdgqa.io.durable import (
    append_jsonl,
    atomic_write,
    clear_stale_temps,
    read_jsonl,
    replace_dir,
)
from kdgqa.io.sources import load_model
from kdgqa.models.locate import attention_heads
from kdgqa.models.registry import family_of
from kdgqa.models.timm_vit import create_timm_vit
from kdgqa.study.config import (
    DataConfig,
    ExperimentConfig,
    check_cells,
    config_to_dict,
)
from kdgqa.study.cpu import choose_cpu_threads, choose_workers, cpu_threads
from kdgqa.study.data import (
    DataSplits,
    check_dataset,
    describe_splits,
    load_splits,
    split_warnings,
)
from kdgqa.study.distributed import DistContext, broadcast_object, resolve_device
from kdgqa.study.lock import LOCK_NAME, study_lock
from kdgqa.study.report import write_report
from kdgqa.study.resume import STUDY_MARKER, check_resumable
from kdgqa.study.runs import RunOutput, RunSpec, execute_run, grid_runs, make_batches
from kdgqa.study.train import evaluate, train
from kdgqa.study.workers import WorkerJob, WorkerPool
from kdgqa.version import __version__

__all__ = [
    "RunSpec",
    "batch_sizes",
    "classifier_plan",
    "environment",
    "grid_runs",
    "model_heads",
    "preflight",
    "run_experiment",
]

RESULTS = "results.jsonl"
ALLOCATION = "allocation.jsonl"
HISTORY = "history.jsonl"


def environment() -> dict[str, Any]:
    """Library versions and the git commit of the code that ran, for every result row."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("kdgqa", "timm", "torchvision", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    if versions["kdgqa"] == "absent":  # run from a source tree (PYTHONPATH=src), not installed
        versions["kdgqa"] = f"{__version__} (source tree)"
    commit = "unknown"
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=5, check=False)
            if dirty.stdout.strip():
                commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "commit": commit}


def model_heads(model: nn.Module) -> int:
    """The query heads of ``model``'s attention layers, or a ``ConfigError``."""
    try:
        return attention_heads(model)
    except ConversionError as error:
        raise ConfigError(str(error)) from None


def _build_base(config: ExperimentConfig, channels: int, num_classes: int) -> nn.Module:
    """The MHA starting point: a fresh timm ViT, or the configured pretrained source."""
    m = config.model
    if m.pretrained:
        # Checkpoints may be stored in bf16 to travel light; training needs fp32 masters.
        # Its classifier stays as it is: each grid run keeps or resets it (classifier_plan).
        return load_model(m.pretrained).float()
    return create_timm_vit(
        img_size=config.data.image_size, patch_size=m.patch_size, in_chans=channels,
        num_classes=num_classes, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio, drop_path_rate=m.drop_path_rate,
    )


def classifier_plan(config: ExperimentConfig, base: nn.Module, pretrained_on: DataSplits,
                    splits: DataSplits) -> tuple[int | None, str]:
    """What every grid run does with ``base``'s classifier: the class count to reset it to
    (None: keep it), and why, for the log. ``pretrained_on`` is the data ``base`` was
    pretrained on here (``splits`` itself when there is no separate pretraining data)."""
    family = family_of(base)
    classes = family.num_classes(base) if family is not None else None
    if config.pretrain is not None:
        same = pretrained_on.classes == splits.classes
        why = ("the pretraining data has the same classes" if same else
               f"pretrained on {pretrained_on.name}'s {pretrained_on.num_classes} classes, "
               f"uptrained on {splits.name}'s {splits.num_classes}")
    else:
        same = classes == splits.num_classes
        why = (f"the pretrained model predicts {classes} classes, "
               f"{'as' if same else 'not'} {splits.num_classes} like {splits.name}")
    if config.classifier == "keep":
        if not same:
            raise ConfigError(f"classifier: keep, but {why}; use classifier: reset (or auto)")
        return None, f"kept (classifier: keep; {why})"
    if config.classifier == "reset":
        return splits.num_classes, ("a new one per run, drawn with the run's seed "
                                    "(classifier: reset)")
    if same:
        return None, f"kept: {why} (classifier: auto)"
    return splits.num_classes, (f"a new one per run, drawn with the run's seed: {why} "
                                "(classifier: auto)")


def _architecture_only(source: str, load: Callable[[str], nn.Module]) -> nn.Module:
    """The model of ``source`` without its weights where that is possible (timm names), so
    checks and ``--dry-run`` work offline; local sources are read as they are."""
    if source.startswith("timm:"):
        import timm

        try:
            with torch.device("meta"):
                model: nn.Module = timm.create_model(source[len("timm:"):], pretrained=False)
            return model
        except RuntimeError as exc:
            raise ConfigError(f"unknown timm model {source!r}: {exc}") from None
    return load(source)


def preflight(config: ExperimentConfig, resume: bool = False) -> None:
    """Everything that can fail cheaply, before any output exists.

    Raises ``ConfigError`` (``DatasetError`` is one) with a single-line message.
    """
    check_dataset(config.data)
    if config.pretrain_data is not None:
        check_dataset(config.pretrain_data)
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} exists and is not a directory")
    if not resume and out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ConfigError(f"output_dir {str(out)!r} is not empty; pass --resume to continue "
                          "that study or choose another output_dir")
    if resume and out.is_dir():
        check_resumable(config, out, RESULTS)
    if config.model.pretrained:
        heads = model_heads(_architecture_only(config.model.pretrained, load_model))
        check_cells(config, heads, f" does not fit the pretrained model ({heads} heads)")


def grid_progress(config: ExperimentConfig,
                  shard: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """Run ids of this grid (or shard) already in ``output_dir``'s results, and those still
    to run, in execution order; what ``--resume`` would skip and what it would do."""
    if config.model.pretrained:
        heads = model_heads(_architecture_only(config.model.pretrained, load_model))
    else:
        heads = config.model.num_heads
    planned = [run.run_id for run in grid_runs(config, heads, shard)]
    done = _done_runs(Path(config.output_dir) / RESULTS)
    return [r for r in planned if r in done], [r for r in planned if r not in done]


def _done_runs(path: Path) -> set[str]:
    return {str(row.get("run_id")) for row in read_jsonl(path)}


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    # One write + fsync; rows a crash left from an unfinished commit of the run are replaced.
    append_jsonl(path, rows)


def _log_fn(ctx: DistContext, log: Callable[[str], None] | None) -> Callable[[str], None]:
    def emit(message: str) -> None:
        if ctx.is_main and log is not None:
            log(message)

    return emit


def run_experiment(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    ctx: DistContext | None = None,
    log: Callable[[str], None] | None = print,
    pretrain_only: bool = False,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Run the study described by ``config``; return the output directory.

    Under ``torchrun`` every rank calls this with the same config; rank 0 writes the files.
    ``pretrain_only`` stops after the MHA model is saved (``OUT/pretrain/model``), e.g. to
    pretrain with DDP on all GPUs and then split the grid with ``shard`` (see
    :func:`grid_runs`); a shard needs a ready model (``model.pretrained``).
    """
    if pretrain_only and config.pretrain is None:
        raise ConfigError("pretrain_only needs a pretrain recipe, but pretrain is null")
    if shard is not None:
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise ConfigError(f"shard {index}/{count} is out of range; expected I/N with "
                              "0 <= I < N")
        if config.pretrain is not None:
            raise ConfigError("a shard runs part of the grid and needs a ready MHA model: "
                              "run with pretrain_only first, then set model.pretrained to "
                              "OUT/pretrain/model and pretrain to null")
    ctx = ctx or DistContext(device=resolve_device(config.device))
    preflight(config, resume=resume)
    out = Path(config.output_dir)
    with study_lock(out) if ctx.is_main else contextlib.nullcontext():
        return _run_study(config, resume=resume, ctx=ctx, emit=_log_fn(ctx, log),
                          pretrain_only=pretrain_only, shard=shard)


def _require_training_images(splits: DataSplits, where: str) -> None:
    """Refuse, before anything is written, a split that leaves nothing to train on."""
    if len(splits.train) == 0:
        raise ConfigError(f"{where}: the training split is empty ({describe_splits(splits)}); "
                          "raise limit_train or lower val_fraction")


def batch_sizes(config: ExperimentConfig) -> dict[str, int]:
    """The batch size of each recipe that trains on ``config.data`` (for the split checks)."""
    sizes = {"uptrain": config.uptrain.batch_size}
    if config.pretrain is not None and config.pretrain_data is None:
        sizes["pretrain"] = config.pretrain.batch_size
    return sizes


def _run_study(config: ExperimentConfig, *, resume: bool, ctx: DistContext,
               emit: Callable[[str], None], pretrain_only: bool,
               shard: tuple[int, int] | None) -> Path:
    out = Path(config.output_dir)
    started = time.perf_counter()
    if ctx.is_main:  # this process holds the lock: any temp file is a killed writer's
        runs = out / "runs"
        for folder in (out, out / "pretrain",
                       *(sorted(runs.iterdir()) if runs.is_dir() else [])):
            clear_stale_temps(folder)
    splits = load_splits(config.data, seed=config.seed).to(ctx.device)
    _require_training_images(splits, "data")
    emit(f"data: {describe_splits(splits)} ({time.perf_counter() - started:.1f} s)")
    for line in split_warnings(len(splits.train), len(splits.val), len(splits.test),
                               batch_sizes(config)):
        emit(line)
    pre_cfg, pre_splits = config.data, splits
    if config.pretrain_data is not None:
        pre_cfg = config.pretrain_data
        pre_splits = load_splits(pre_cfg, seed=config.seed).to(ctx.device)
        _require_training_images(pre_splits, "pretrain_data")
        emit(f"pretrain data: {describe_splits(pre_splits)}")
        if pre_splits.channels != splits.channels:
            raise ConfigError(f"pretrain_data ({pre_splits.name}) has {pre_splits.channels}-"
                              f"channel images but data ({splits.name}) has {splits.channels}; "
                              "the patch embedding is shared, so they must match")
    torch.manual_seed(config.seed)
    base = _build_base(config, pre_splits.channels, pre_splits.num_classes).to(ctx.device)
    threads: int | None = None
    if ctx.device.type == "cpu":
        threads, why = choose_cpu_threads(config.cpu_threads, parameter_count(base))
        emit(f"cpu threads: {threads} ({why})")
    reset_to: int | None = None
    if not pretrain_only:
        reset_to, why = classifier_plan(config, base, pre_splits, splits)
        emit(f"classifier: {why}")
    todo = [] if pretrain_only else _grid_todo(config, model_heads(base), shard)
    workers = 1
    if ctx.device.type == "cpu" and not ctx.distributed:
        workers, why = choose_workers(config.cpu_workers, threads, len(todo))
        if workers > 1:
            emit(f"grid: {len(todo)} runs in {workers} worker processes ({why})")
    ctx.barrier()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / STUDY_MARKER, [json.dumps({"kdgqa_study": 1,
                                                       "name": config.name}).encode()])
        atomic_write(out / "config.yaml",
                     [yaml.safe_dump(config_to_dict(config), sort_keys=False).encode()])
        meta = {**environment(), "device": str(ctx.device), "world_size": ctx.world_size,
                "cpu_threads": threads, "cpu_workers": workers, "name": config.name,
                "command": shlex.join(sys.argv),
                "data_name": splits.name, "data": describe_splits(splits),
                "pretrain_data": (describe_splits(pre_splits) if pre_splits is not splits
                                  else None)}
        atomic_write(out / "meta.json", [json.dumps(meta, indent=2).encode()])
    env = broadcast_object(environment() if ctx.is_main else None, ctx)
    env["cpu_threads"] = threads
    ctx.barrier()
    with cpu_threads(threads) if threads is not None else contextlib.nullcontext():
        base = _pretrained_base(config, base, pre_cfg, pre_splits, resume=resume, ctx=ctx,
                                emit=emit)
        if pretrain_only:
            emit(f"pretrained model: {out / 'pretrain' / 'model'}")
            return out
        # Workers start only now: started before pretraining, their imports slowed it down
        # more than they saved (measured on two shared cores).
        with WorkerPool(workers) as pool:
            outputs: Iterable[RunOutput]
            if workers > 1:
                outputs = pool.run(WorkerJob(config_to_dict(config), base, splits, env, resume,
                                             threads or 1, reset_to), todo)
            else:
                outputs = (execute_run(config, base, splits, spec, label=label, env=env,
                                       resume=resume, ctx=ctx, reset_classifier=reset_to)
                           for label, spec in todo)
            _commit_runs(config, outputs, ctx=ctx, emit=emit)
    if ctx.is_main:
        table = write_report(out)
        emit(table)
        emit(f"study finished in {time.perf_counter() - started:.1f} s; report: "
             f"{out / 'report.md'}")
    ctx.barrier()
    return out


def _pretrained_base(config: ExperimentConfig, base: nn.Module, data: DataConfig,
                     splits: DataSplits, *, resume: bool, ctx: DistContext,
                     emit: Callable[[str], None]) -> nn.Module:
    """The MHA model the grid starts from: ``base`` pretrained by ``config.pretrain`` (or
    reloaded from a finished pretraining when resuming), or ``base`` as it is."""
    if config.pretrain is None:
        return base
    out = Path(config.output_dir)
    pre_dir = out / "pretrain"
    model_dir = pre_dir / "model"
    if resume and (model_dir / "kdgqa_config.json").is_file():
        emit(f"pretrain: reusing {model_dir}")
        return load(model_dir).to(ctx.device)
    tb, vb, teb = make_batches(data, splits, config.pretrain.batch_size, config.seed, ctx)
    res = train(base, tb, vb, config.pretrain, run_dir=pre_dir, resume=resume,
                progress=config.progress, desc="pretrain MHA", ctx=ctx)
    test = evaluate(base, teb, amp=config.pretrain.amp, ctx=ctx)
    emit(f"pretrain: best val acc {res.best_val_acc:.4f}, test acc {test['acc']:.4f}, "
         f"{res.images_per_s:.0f} img/s, {res.train_seconds:.1f} s")
    if ctx.is_main:
        _append(out / HISTORY, [{"run_id": "pretrain", **h} for h in res.history])
        replace_dir(model_dir, lambda d: save_pretrained(base, d))
        (pre_dir / "checkpoint.pt").unlink(missing_ok=True)
    ctx.barrier()
    return base


def _grid_todo(config: ExperimentConfig, heads: int, shard: tuple[int, int] | None
               ) -> list[tuple[str, RunSpec]]:
    """The grid's runs (or the shard's) not in ``results.jsonl`` yet, with their labels."""
    done = _done_runs(Path(config.output_dir) / RESULTS)
    runs = grid_runs(config, heads, shard)
    return [(f"[{index + 1}/{len(runs)}]", spec) for index, spec in enumerate(runs)
            if spec.run_id not in done]


def _commit_runs(config: ExperimentConfig, outputs: Iterable[RunOutput], *, ctx: DistContext,
                 emit: Callable[[str], None]) -> None:
    """Log each finished run and append its rows (the only writer of the study's logs)."""
    out = Path(config.output_dir)
    for output in outputs:
        emit(output.message)
        if ctx.is_main:
            _append(out / ALLOCATION, output.allocation)
            _append(out / HISTORY, output.history)
            _append(out / RESULTS, [output.row])
            # The optimizer state is only needed to resume; best.pt keeps the weights.
            (out / "runs" / output.spec.run_id / "checkpoint.pt").unlink(missing_ok=True)
        ctx.barrier()
