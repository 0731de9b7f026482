"""The training loop shared by MHA pretraining and GQA uptraining.

Read top to bottom: AdamW with a constant or cosine schedule (linear warmup), gradient
clipping, bf16 autocast on CUDA, optional ``torch.compile``. Every ``checkpoint_every`` steps
and at the end a checkpoint is written atomically (temp file + ``os.replace``) with a sha256
header (``kdgqa.io.durable``) holding model, optimizer, scheduler, data position, RNG states and
the run's history, so ``resume=True`` continues from the exact step with the same batches
(a corrupt, foreign or mismatched checkpoint is refused in one line); the allocators'
buffers (DGQA state) travel in the model's state dict. A non-finite or exploding loss stops
the run with ``TrainingDiverged`` before anything is saved, so the last checkpoint on disk
stays good.
The validation split picks the best weights, which are restored at the end.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdgqa.attention import GroupedQueryAttention, start_epoch
from kdgqa.errors import CorruptFileError, DatasetError
from kdgqa.io.durable import load_checkpoint, remove_stale_temps, save_checkpoint
from kdgqa.study.config import TrainConfig, config_to_dict
from kdgqa.study.data import Batches
from kdgqa.study.distributed import DistContext, all_reduce_sum, sync_key_statistics
from kdgqa.study.divergence import DivergenceGuard, TrainingDiverged
from kdgqa.study.mixing import mix_batch

__all__ = [
    "CorruptFileError",
    "TrainResult",
    "TrainingDiverged",
    "atomic_save",
    "build_optimizer",
    "check_training_state",
    "evaluate",
    "load_checkpoint",
    "lr_factor",
    "record_allocation",
    "train",
]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


@dataclass
class TrainResult:
    """What a training run produced (also what the experiment records)."""

    steps: int
    epochs_done: int
    finished: bool
    best_val_acc: float
    best_val_loss: float
    best_step: int
    images_per_s: float
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    allocation: list[dict[str, Any]] = field(default_factory=list)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, recipe: TrainConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, tokens and position embeddings.

    On the CPU the fused implementation (one kernel for all parameters instead of a loop of
    small ones, and elementwise, so independent of the thread count); on GPUs torch's
    default, which the published GPU study used.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cpu = all(p.device.type == "cpu" for p in [*decay, *no_decay])
    return torch.optim.AdamW(groups, lr=recipe.lr, fused=True if on_cpu else None)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    *,
    amp: bool = True,
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over ``batches`` (summed over ranks)."""
    ctx = ctx or DistContext(device=batches.device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=batches.device)
    for x, y in batches.epoch(0):
        with _autocast(batches.device, amp):
            logits = model(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == y).sum()
        totals[2] += y.numel()
    all_reduce_sum(totals, ctx)
    model.train(was_training)
    n = max(1.0, float(totals[2]))
    return {"loss": float(totals[0]) / n, "acc": float(totals[1]) / n, "n": float(totals[2])}


def record_allocation(model: nn.Module, step: int) -> list[dict[str, Any]]:
    """Queries per KV head in each key-driven layer's last forward pass.

    ``counts`` is the first input's map; a per-input scheme (one map per input) also records
    ``input_counts``: each distinct map of the batch with the share of inputs that had it,
    most common first, so a study can tell whether inputs ever left the even split.
    """
    rows = []
    layer = 0
    for _, module in model.named_modules():
        if not isinstance(module, GroupedQueryAttention):
            continue
        if module.allocator.key_driven and module.last_kv_index is not None:
            index = module.last_kv_index.reshape(-1, module.num_heads)
            counts = torch.bincount(index[0], minlength=module.num_kv_heads)
            row: dict[str, Any] = {"step": step, "layer": layer, "counts": counts.tolist()}
            if index.shape[0] > 1:
                per_input = torch.zeros(index.shape[0], module.num_kv_heads, dtype=torch.long,
                                        device=index.device)
                per_input.scatter_add_(1, index.long(), torch.ones_like(index, dtype=torch.long))
                maps, seen = torch.unique(per_input, dim=0, return_counts=True)
                order = seen.argsort(descending=True)
                row["input_counts"] = [
                    {"counts": maps[i].tolist(), "share": seen[i].item() / index.shape[0]}
                    for i in order.tolist()
                ]
            rows.append(row)
        layer += 1
    return rows


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` as a checksummed checkpoint: temp file in the same folder, fsync, rename.

    A crash mid-write leaves the previous file intact; read it back with
    :func:`load_checkpoint`, which verifies the sha256 before unpickling (weights only).
    """
    save_checkpoint(obj, path)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    legacy = np.random.get_state(legacy=False)
    assert isinstance(legacy, dict)
    # Tensors and plain numbers only, so the checkpoint loads with weights_only=True.
    numpy_state = {"bit_generator": str(legacy["bit_generator"]),
                   "key": torch.from_numpy(legacy["state"]["key"].astype(np.int64)),
                   "pos": int(legacy["state"]["pos"]), "has_gauss": int(legacy["has_gauss"]),
                   "gauss": float(legacy["gauss"])}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].cpu().numpy().astype(np.uint32),
                                   "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


#: Recipe fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = ("checkpoint_every", "compile", "sync_every")


def check_training_state(state: Any, path: Path, recipe: TrainConfig) -> None:
    """Raise :class:`CorruptFileError` unless ``state`` (a loaded ``checkpoint.pt``) is a
    training checkpoint written with ``recipe`` (what a resume checks before writing)."""
    needed = ("model", "optimizer", "scheduler", "position", "history", "allocation", "best",
              "timing", "loss_avg", "epoch_sums", "rng", "recipe")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise CorruptFileError(f"{str(path)!r} is not a kdgqa training checkpoint (keys "
                               "missing); move it away to restart that run")
    ours = config_to_dict(recipe)
    theirs = state["recipe"] if isinstance(state["recipe"], dict) else {}
    # Keys on one side only come from another kdgqa version: their defaults keep behaviour.
    changed = sorted(k for k in set(ours) & set(theirs)
                     if k not in _RESUMABLE_CHANGES and ours[k] != theirs[k])
    if changed:
        key = changed[0]
        raise CorruptFileError(
            f"{str(path)!r} was written with a different training recipe ({key}: "
            f"{theirs.get(key)!r}, now {ours.get(key)!r}); resume with the recipe it was "
            "written with, or move the run directory away to start afresh")


def _restore(state: Any, path: Path, recipe: TrainConfig, load: Callable[[Any], None]) -> None:
    """Check that a loaded checkpoint belongs to this run, then hand it to ``load``."""
    check_training_state(state, path, recipe)
    try:
        load(state)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CorruptFileError(
            f"{str(path)!r} does not fit this run ({first}); resume with the model and "
            "scheme it was written for, or move the run directory away to start afresh"
        ) from None


class _NoBar:
    """What a disabled progress bar needs to do: nothing. (A disabled tqdm still creates a
    multiprocessing lock, which a grid worker stopped on an error would leave behind.)"""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A progress bar on stderr when it is a terminal and bars are wanted, else nothing."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                dynamic_ncols=True)


@dataclass
class _Position:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def train(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches | None,
    recipe: TrainConfig,
    *,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    max_steps: int | None = None,
    ctx: DistContext | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place; return metrics. The best validation weights are restored.

    ``run_dir`` receives ``checkpoint.pt`` (latest, for resuming) and ``best.pt``.
    ``max_steps`` stops early after that many optimizer steps in total (with a checkpoint),
    e.g. to fit a job's time limit; a later ``resume=True`` call finishes the run.
    """
    ctx = ctx or DistContext(device=train_batches.device)
    device = train_batches.device
    run_dir = Path(run_dir)
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise DatasetError("the training split is empty")
    total_steps = steps_per_epoch * recipe.epochs
    base = model
    optimizer = build_optimizer(base, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps, recipe.warmup_steps, recipe.schedule),
    )
    pos = _Position()
    history: list[dict[str, Any]] = []
    allocation: list[dict[str, Any]] = []
    best = {"acc": -1.0, "loss": math.inf, "step": -1}
    timing = {"seconds": 0.0, "images": 0.0}
    guard = DivergenceGuard(recipe.explode_factor)
    epoch_sums = {"loss": 0.0, "n": 0}  # survive a mid-epoch resume

    ckpt_path = run_dir / CHECKPOINT
    if ctx.is_main:  # temp files of a writer that was killed
        remove_stale_temps(ckpt_path)
        remove_stale_temps(run_dir / BEST)
    if resume and ckpt_path.is_file():
        def restore(state: dict[str, Any]) -> None:
            nonlocal pos, history, allocation, best, timing, epoch_sums
            base.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            pos = _Position(**state["position"])
            history, allocation = state["history"], state["allocation"]
            best, timing = state["best"], state["timing"]
            guard.load_state(state["loss_avg"])
            epoch_sums = state["epoch_sums"]
            _set_rng_state(state["rng"])

        _restore(load_checkpoint(ckpt_path, map_location=device), ckpt_path, recipe, restore)

    def save_checkpoint() -> None:
        if ctx.is_main:
            atomic_save({
                "model": base.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "position": vars(pos).copy(),
                "history": history, "allocation": allocation, "best": dict(best),
                "timing": dict(timing), "loss_avg": guard.state(), "rng": _rng_state(),
                "epoch_sums": dict(epoch_sums),
                "recipe": config_to_dict(recipe),
            }, ckpt_path)
        ctx.barrier()

    unsync = sync_key_statistics(base, ctx)
    net: nn.Module = base
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # Buffers (DGQA state) are already equal on every rank: no broadcast needed.
        net = DistributedDataParallel(base, device_ids=ids, broadcast_buffers=False)
    if recipe.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    key_driven = any(isinstance(m, GroupedQueryAttention) and m.allocator.key_driven
                     for m in base.modules())

    bar = _progress(total_steps, pos.global_step, desc, progress and ctx.is_main)
    finished = True
    # Losses and gradient norms stay on the device and are read in batches of
    # ``recipe.sync_every`` steps (one host sync each), always before anything is saved or
    # evaluated: a diverged step is then reported a few steps late, never written to disk.
    pending: list[tuple[int, int, int, Tensor, Tensor]] = []
    mark = time.perf_counter()

    def drain() -> None:
        nonlocal mark
        if pending:
            values = torch.stack([t.float() for p in pending for t in p[3:]]).tolist()
            for i, (step, epoch, n, _, _) in enumerate(pending):
                value, norm = values[2 * i], values[2 * i + 1]
                try:
                    guard.check(value, norm, where=f"at step {step} (epoch {epoch})")
                except TrainingDiverged as error:
                    kept = (f"the last good checkpoint is {ckpt_path}" if ckpt_path.is_file()
                            else "no checkpoint was written yet")
                    raise TrainingDiverged(
                        f"{desc}: {error}; stopped without saving ({kept}); lower the learning "
                        "rate or raise grad clipping") from None
                epoch_sums["loss"] += value * n
                epoch_sums["n"] += n
            pending.clear()
            now = time.perf_counter()
            timing["seconds"] += now - mark
            mark = now
            rate = timing["images"] / max(timing["seconds"], 1e-9)
            bar.set_postfix(loss=f"{values[-2]:.3f}", img_s=f"{rate:.0f}", refresh=False)
    try:
        net.train()
        while pos.epoch < recipe.epochs:
            if pos.step_in_epoch == 0:
                start_epoch(base)
            batches: Iterator[tuple[Tensor, Tensor]] = train_batches.epoch(
                pos.epoch, pos.step_in_epoch)
            if pos.step_in_epoch == 0:
                epoch_sums = {"loss": 0.0, "n": 0}
            for x, y in batches:
                if max_steps is not None and pos.global_step >= max_steps:
                    finished = False
                    break
                mixed = mix_batch(x, y, mixup=recipe.mixup, cutmix=recipe.cutmix,
                                  prob=recipe.mix_prob, seed=train_batches.seed,
                                  epoch=pos.epoch, step=pos.step_in_epoch)
                with _autocast(device, recipe.amp):
                    if mixed is None:
                        logits = net(x)
                        loss = F.cross_entropy(logits.float(), y,
                                               label_smoothing=recipe.label_smoothing)
                    else:
                        logits = net(mixed.images)
                        loss = mixed.lam * F.cross_entropy(
                            logits.float(), mixed.labels,
                            label_smoothing=recipe.label_smoothing) + (1.0 - mixed.lam) * (
                            F.cross_entropy(logits.float(), mixed.partner_labels,
                                            label_smoothing=recipe.label_smoothing))
                if not guard.chance:  # a uniform prediction's loss, known from the logits
                    guard.chance = math.log(max(2, logits.shape[-1]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), recipe.grad_clip)
                else:
                    grad_norm = torch.zeros((), device=device)
                optimizer.step()
                scheduler.step()
                timing["images"] += float(y.numel() * ctx.world_size)
                pending.append((pos.global_step, pos.epoch, y.numel(), loss.detach(),
                                grad_norm.detach()))
                if key_driven and recipe.allocation_every and (
                    pos.global_step % recipe.allocation_every == 0
                ):
                    allocation += record_allocation(base, pos.global_step)
                pos.global_step += 1
                pos.step_in_epoch += 1
                bar.update(1)
                if len(pending) >= recipe.sync_every:
                    drain()
                if recipe.checkpoint_every and pos.global_step % recipe.checkpoint_every == 0:
                    drain()
                    save_checkpoint()
                    mark = time.perf_counter()
            drain()
            if not finished:
                break
            row: dict[str, Any] = {"epoch": pos.epoch, "step": pos.global_step,
                                   "train_loss": epoch_sums["loss"] / max(1, epoch_sums["n"]),
                                   "lr": scheduler.get_last_lr()[0]}
            last = pos.epoch + 1 == recipe.epochs
            if val_batches is not None and ((pos.epoch + 1) % recipe.eval_every == 0 or last):
                metrics = evaluate(base, val_batches, amp=recipe.amp, ctx=ctx)
                net.train()
                row.update(val_loss=metrics["loss"], val_acc=metrics["acc"])
                if metrics["acc"] > best["acc"] or (
                    metrics["acc"] == best["acc"] and metrics["loss"] < best["loss"]
                ):
                    best = {"acc": metrics["acc"], "loss": metrics["loss"],
                            "step": pos.global_step}
                    if ctx.is_main:
                        atomic_save(copy.deepcopy(base.state_dict()), run_dir / BEST)
                mark = time.perf_counter()
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(row)
            pos.epoch += 1
            pos.step_in_epoch = 0
        save_checkpoint()
    finally:
        bar.close()
        unsync()

    if finished and best["step"] >= 0:
        ctx.barrier()
        base.load_state_dict(load_checkpoint(run_dir / BEST, map_location=device))
    return TrainResult(
        steps=pos.global_step, epochs_done=pos.epoch, finished=finished,
        best_val_acc=float(best["acc"]), best_val_loss=float(best["loss"]),
        best_step=int(best["step"]),
        images_per_s=timing["images"] / max(timing["seconds"], 1e-9),
        train_seconds=timing["seconds"], history=history, allocation=allocation,
    )
