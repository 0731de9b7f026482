"""One grid run of a study: convert the MHA model, uptrain it, evaluate it, describe it.

Everything a run produces comes back as a :class:`RunOutput` (its result row, allocation and
history records, its log line), written by the caller: the study's one writer, whether the
run happened in the same process or in a worker (:mod:`kdgqa.study.workers`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdgqa.errors import ConfigError
from kdgqa.models.locate import attention_heads, kv_cache_bytes_per_token
from kdgqa.models.registry import family_of
from kdgqa.study.calibration_images import convert_grid_cell
from kdgqa.study.config import DataConfig, ExperimentConfig, resolve_scheme
from kdgqa.study.data import Augment, Batches, DataSplits
from kdgqa.study.distributed import DistContext
from kdgqa.study.train import TrainResult, evaluate, train

__all__ = ["RunOutput", "RunSpec", "execute_run", "grid_runs", "make_batches"]


@dataclass(frozen=True)
class RunSpec:
    """One grid cell: a scheme (or a named variant of one) at a KV-head count with a seed."""

    scheme: str
    kv_heads: int
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.scheme}-g{self.kv_heads}-s{self.seed}"


def grid_runs(config: ExperimentConfig, num_heads: int,
              shard: tuple[int, int] | None = None) -> list[RunSpec]:
    """Runs in execution order: MHA references first (when asked), then seeds innermost.

    ``shard=(i, n)`` keeps every n-th run starting at i, so n processes (one per GPU) split
    a grid between them without talking to each other; ``kdgqa report`` merges their outputs.
    """
    g = config.grid
    runs = [RunSpec("mha", num_heads, s) for s in g.seeds] if g.include_mha else []
    runs += [RunSpec(scheme, kv, seed) for kv in g.kv_heads for scheme in g.schemes
             for seed in g.seeds]
    if shard is not None:
        index, count = shard
        runs = runs[index::count]
    return runs


@dataclass
class RunOutput:
    """What one finished run leaves for the study's files and log."""

    spec: RunSpec
    row: dict[str, Any]
    allocation: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""


def make_batches(d: DataConfig, splits: DataSplits, batch_size: int, seed: int,
                 ctx: DistContext) -> tuple[Batches, Batches, Batches]:
    """Training (augmented, seeded), validation and test batches of ``splits``."""
    common: dict[str, Any] = {"image_size": d.image_size, "mean": d.mean, "std": d.std,
              "rank": ctx.rank, "world_size": ctx.world_size}
    eval_batch = max(batch_size, 256 // ctx.world_size * ctx.world_size)
    train_b = Batches(splits.train, batch_size, augment=Augment.from_config(d), seed=seed,
                      **common)
    val_b = Batches(splits.val, eval_batch, shuffle=False, drop_last=False, **common)
    test_b = Batches(splits.test, eval_batch, shuffle=False, drop_last=False, **common)
    return train_b, val_b, test_b


def execute_run(config: ExperimentConfig, base: nn.Module, splits: DataSplits, spec: RunSpec,
                *, label: str, env: dict[str, Any], resume: bool, ctx: DistContext,
                reset_classifier: int | None = None) -> RunOutput:
    """Convert a copy of ``base`` for ``spec``, uptrain and evaluate it; nothing is written
    but the run's own checkpoints under ``OUTPUT/runs/<run_id>/``.

    ``reset_classifier``: give the copy a new classifier for that many classes first, drawn
    with the run's seed, so each seed of a transfer study has its own (None: keep it).
    """
    out = Path(config.output_dir)
    torch.manual_seed(spec.seed)
    model = copy.deepcopy(base)
    if reset_classifier is not None:
        family = family_of(model)
        if family is None:
            raise ConfigError(f"cannot give a {type(model).__name__} a new classifier")
        family.reset_classifier(model, reset_classifier)
    scheme, options = resolve_scheme(config.grid, spec.scheme)
    if scheme != "mha":
        # Calibrated schemes, fitted/aligned pooling and distillation use the first training
        # images (no augmentation).
        convert_grid_cell(model, base, config.grid, spec.scheme, spec.kv_heads,
                          lambda: splits.train, config.data, spec.seed)
    model.to(ctx.device)
    tb, vb, teb = make_batches(config.data, splits, config.uptrain.batch_size, spec.seed, ctx)
    converted = evaluate(model, teb, amp=config.uptrain.amp, ctx=ctx)
    res = train(model, tb, vb, config.uptrain, run_dir=out / "runs" / spec.run_id,
                resume=resume, progress=config.progress, desc=f"{label} {spec.run_id}", ctx=ctx)
    test = evaluate(model, teb, amp=config.uptrain.amp, ctx=ctx)
    heads = attention_heads(model)
    row = _result_row(spec, heads, model, res, converted, test, env, ctx)
    row.update(base_scheme=scheme, scheme_options=options,
               classifier="reset" if reset_classifier is not None else "kept")
    ids = {"run_id": spec.run_id}
    return RunOutput(
        spec, row,
        allocation=[{**ids, "scheme": spec.scheme, "kv_heads": spec.kv_heads,
                     "seed": spec.seed, **a} for a in res.allocation],
        history=[{**ids, **h} for h in res.history],
        message=(f"{label} {spec.run_id}: test acc {test['acc']:.4f} (after conversion "
                 f"{converted['acc']:.4f}), {res.images_per_s:.0f} img/s"))


def _result_row(spec: RunSpec, heads: int, model: nn.Module, res: TrainResult,
                converted: dict[str, float], test: dict[str, float], env: dict[str, Any],
                ctx: DistContext) -> dict[str, Any]:
    return {
        "run_id": spec.run_id, "scheme": spec.scheme, "kv_heads": spec.kv_heads,
        "num_heads": heads, "seed": spec.seed,
        "test_acc": test["acc"], "test_loss": test["loss"], "test_images": int(test["n"]),
        "converted_test_acc": converted["acc"],
        "best_val_acc": res.best_val_acc, "best_val_loss": res.best_val_loss,
        "best_step": res.best_step, "steps": res.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
        "train_img_per_s": res.images_per_s, "train_seconds": res.train_seconds,
        "world_size": ctx.world_size, "device": str(ctx.device),
        "cpu_threads": env.get("cpu_threads"),
        "commit": env["commit"], **{f"version_{k}": v for k, v in env["versions"].items()},
    }
