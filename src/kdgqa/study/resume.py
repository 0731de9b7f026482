"""Checks done before ``kdgqa experiment --resume`` writes anything into an existing study.

A study directory can be resumed only with the configuration that produced it and only when
the files the resumed runs will read are intact. :func:`check_resumable` checks both up front,
so a foreign config or a corrupt checkpoint costs one line (exit status 2) and no file changes,
instead of a crash half-way through or results mixed from two different studies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdgqa.errors import ConfigError
from kdgqa.io.checkpoint import CONFIG_NAME, verify
from kdgqa.io.durable import load_checkpoint, read_jsonl, verify_checkpoint
from kdgqa.study.config import (
    ExperimentConfig,
    TrainConfig,
    config_to_dict,
    parse_config,
    read_yaml,
)
from kdgqa.study.lock import LOCK_NAME
from kdgqa.study.train import check_training_state

__all__ = ["RESUMABLE_CHANGES", "STUDY_MARKER", "check_resumable", "config_difference",
           "is_study"]

#: Written into every study directory when it starts: ``--resume`` goes nowhere else.
STUDY_MARKER = "kdgqa-study.json"


def is_study(out: Path) -> bool:
    """Whether ``out`` is a kdgqa study directory (its marker, or for studies begun before
    the marker existed, both ``config.yaml`` and ``meta.json``)."""
    return (out / STUDY_MARKER).is_file() or (
        (out / "config.yaml").is_file() and (out / "meta.json").is_file())

#: Settings that may differ between a study and its resumption: where and how it runs, and
#: the grid's extent (new cells are added; finished cells keep their results).
RESUMABLE_CHANGES = frozenset({
    "name", "output_dir", "device", "progress", "cpu_workers",
    "grid.schemes", "grid.kv_heads", "grid.seeds", "grid.include_mha",
    "pretrain.checkpoint_every", "pretrain.compile", "pretrain.sync_every",
    "uptrain.checkpoint_every", "uptrain.compile", "uptrain.sync_every",
})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    # A scheme's options compare as one value: {"window_size": 10} vs {} is one change.
    if isinstance(value, dict) and not prefix.startswith(_GROWABLE):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


#: Per-label settings: options or a variant that only one side has are allowed when the study
#: being resumed never ran that label (a grid that gained a cell); anything else must match.
_GROWABLE = ("grid.scheme_options.", "grid.variants.")


def config_difference(stored: ExperimentConfig, current: ExperimentConfig) -> str | None:
    """The first setting (dotted key) that changes results and differs, or None."""
    a, b = _flatten(config_to_dict(stored)), _flatten(config_to_dict(current))
    ran = set(stored.grid.schemes)
    ran |= {str(v.get("scheme")) for label, v in stored.grid.variants.items() if label in ran}
    for key in sorted(set(a) | set(b)):
        # A null section against a filled one differs in keys present on one side only.
        if key in RESUMABLE_CHANGES or (key in a and key in b and a[key] == b[key]):
            continue
        if key.startswith("grid.scheme_options.") and (a.get(key) or {}) == (b.get(key) or {}):
            continue  # no options and empty options build the same cell
        label = key.split(".", 2)[-1]
        if key.startswith(_GROWABLE) and (key in a) != (key in b) and label not in ran:
            continue
        return key
    return None


def check_resumable(config: ExperimentConfig, out: Path, results: str = "results.jsonl") -> None:
    """Raise ``ConfigError``/``CorruptFileError`` (one line) unless ``out`` can be resumed."""
    if not out.is_dir() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return  # nothing to resume (a stale lock at most): the study starts there
    if not is_study(out):
        raise ConfigError(
            f"--resume: {str(out)!r} holds files but is not a kdgqa study (no {STUDY_MARKER}, "
            "no config.yaml and meta.json); give the study's own output_dir, or an empty or "
            "new one")
    stored_path = out / "config.yaml"
    if not stored_path.is_file() and (out / results).is_file():
        raise ConfigError(
            f"--resume: {str(stored_path)!r} is missing, so the finished runs in "
            f"{str(out / results)!r} cannot be checked against this config; restore it, or "
            "start the study in another output_dir")
    if stored_path.is_file():
        try:
            stored = parse_config(read_yaml(stored_path.read_text()))
        except (OSError, ValueError, yaml.YAMLError, RecursionError) as error:
            detail = " ".join(str(error).split()) or type(error).__name__
            raise ConfigError(
                f"cannot read {str(stored_path)!r}, the config of the study being resumed "
                f"({detail}); restore it or start the study in another output_dir") from None
        key = config_difference(stored, config)
        if key is not None:
            before, now = _flatten(config_to_dict(stored)), _flatten(config_to_dict(config))
            raise ConfigError(
                f"--resume: {str(out)!r} holds a study run with a different config ({key}: "
                f"{before.get(key)!r} there, {now.get(key)!r} now); resume with the config "
                f"saved in {str(stored_path)!r} or choose another output_dir")
    done = {row.get("run_id") for row in read_jsonl(out / results)}
    for log in ("history.jsonl", "allocation.jsonl"):  # appended to by the resumed runs
        read_jsonl(out / log)

    pretrain = out / "pretrain"
    if (pretrain / "model" / CONFIG_NAME).exists():
        verify(pretrain / "model")
    elif config.pretrain is not None:
        _check_run_files(pretrain, config.pretrain)
    runs = out / "runs"
    if runs.is_dir():
        for run_dir in sorted(runs.iterdir()):
            if run_dir.name in done or not run_dir.is_dir():
                continue
            _check_run_files(run_dir, config.uptrain)


def _check_run_files(run_dir: Path, recipe: TrainConfig) -> None:
    """The checkpoints an unfinished run will resume from: intact, and (``checkpoint.pt``) a
    training state of ``recipe``, so nothing is written before a resume that would fail."""
    for name in ("checkpoint.pt", "best.pt"):
        if (run_dir / name).exists():
            verify_checkpoint(run_dir / name)
    if (run_dir / "checkpoint.pt").exists():
        state = load_checkpoint(run_dir / "checkpoint.pt", map_location="cpu")
        check_training_state(state, run_dir / "checkpoint.pt", recipe)
