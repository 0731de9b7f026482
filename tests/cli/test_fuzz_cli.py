"""Fuzzing the CLI and config surface: whatever the input, ``kdgqa`` prints a plan (or converts)
and exits 0, or prints exactly one ``kdgqa: error:`` line and exits 2. Never a traceback.

Configs go through ``kdgqa experiment CONFIG --dry-run`` (so valid-but-huge studies do not
train); ``kdgqa convert`` runs for real on a tiny model. Hypothesis keeps the examples it finds
failing in its database, so a failure replays.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import TINY_VIT
from kdgqa.cli import main
from kdgqa.io.checkpoint import load
from kdgqa.models.timm_vit import create_timm_vit
from kdgqa.schemes import available_schemes
from kdgqa.study.config import config_to_dict, default_config

FUZZ = settings(max_examples=int(os.environ.get("KDGQA_FUZZ_EXAMPLES", "300")), deadline=None,
                derandomize="KDGQA_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SMALL = settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 5))

# ----------------------------------------------------------------------------- values

EVIL_NUMBERS = st.sampled_from([
    0, -1, 1, 2, 3, 6, -(2**31), 2**31, 2**63, 10**30, -(10**30), 0.0, -0.0, 0.5, -1.5, 1e-300,
    1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324,
])
SCALARS = st.one_of(
    st.none(), st.booleans(), EVIL_NUMBERS, st.integers(), st.floats(),
    st.text(max_size=20), st.sampled_from(["gqa", "kdgqa", "dgqa-ema", "fancy", "", "cuda:x",
                                           "timm:vit_tiny_patch16_224", "timm:hf-hub:x/y",
                                           "cpu", "auto", "1e5", "NaN", "\x00", "~"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)

# A small valid study: the fuzzed documents start from it, so most of them get deep.
BASE = config_to_dict(default_config())
BASE.update(output_dir="out", device="cpu", progress=False)
BASE["grid"].update(schemes=["gqa", "kdgqa", "dgqa-ema"], kv_heads=[2, 3], seeds=[0])


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))


CONFIG_PATHS = sorted(set(_paths(BASE)) | {("pretrain_data",), ("pretrain", "epochs"),
                                           ("grid", "scheme_options", "kdgqa"),
                                           ("grid", "scheme_options", "dgqa-diff", "beta")})


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(doc.get(key), dict):
            doc[key] = {}
        doc = doc[key]
    doc[path[-1]] = value


WORDS = ["digits", "cifar10", "imagefolder", "cpu", "auto", "cuda:0", "constant", "cosine",
         "mean", "first", "random", *available_schemes(), "x"]


def _plausible(value: Any, path: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Values of the right type, often valid, sometimes huge: they reach the deep checks."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(0, 8) | st.sampled_from([64, 10**6, 2**40])
    if isinstance(value, float):
        return st.floats(0, 1) | st.sampled_from([1e-5, 3.0, 1e300])
    if isinstance(value, str):
        return st.sampled_from([value, *WORDS])
    if isinstance(value, list):
        items: st.SearchStrategy[Any] = (st.sampled_from(available_schemes())
                                          if path[-1] == "schemes" else st.integers(0, 7))
        return st.lists(items, min_size=1, max_size=4, unique=True)
    return VALUES


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(CONFIG_PATHS))
        current: Any = BASE
        for key in path:
            current = current.get(key) if isinstance(current, dict) else None
        evil = draw(st.integers(0, 3)) == 0
        _set(doc, path, draw(VALUES if evil else _plausible(current, path)))
    if draw(st.integers(0, 4)) == 0:
        _set(doc, (draw(st.text(min_size=1, max_size=8)),), draw(VALUES))  # an unknown key
    return doc


# ----------------------------------------------------------------------------- the contract

@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    cwd = os.getcwd()
    folder = Path(tempfile.mkdtemp(prefix="kdgqa-fuzz-"))
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)
        shutil.rmtree(folder, ignore_errors=True)


def _check_contract(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = main(argv)  # any uncaught exception fails the test with its traceback
    out, err = capsys.readouterr()
    if status == 0:
        assert err == "", err
        return status, out
    lines = err.strip().splitlines()
    assert status == 2 and out == "", (status, out, err)
    assert len(lines) == 1 and lines[0].startswith("kdgqa: error: "), err
    return status, lines[0]


def _dry_run(capsys: pytest.CaptureFixture[str], text: str) -> tuple[int, str]:
    with _scratch() as folder:
        (folder / "c.yaml").write_text(text)
        status, said = _check_contract(capsys, ["experiment", "c.yaml", "--dry-run"])
        assert sorted(p.name for p in folder.iterdir()) == ["c.yaml"], "a dry run wrote files"
    if status == 0:
        assert said.startswith("experiment '") and "grid:" in said, said
    return status, said


@FUZZ
@given(doc=mutated_configs())
def test_mutated_configs_plan_or_fail_in_one_line(
    doc: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _dry_run(capsys, yaml.safe_dump(doc, allow_unicode=True))


@SMALL
@given(doc=VALUES)
def test_random_yaml_documents(doc: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _dry_run(capsys, yaml.safe_dump(doc, allow_unicode=True))


@SMALL
@given(text=st.text(max_size=200))
def test_random_text_as_config(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    _dry_run(capsys, text)


@pytest.mark.parametrize("text", [
    "[" * 5000 + "]" * 5000,  # deeper than the YAML composer can recurse
    "a: &a [1, 2]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\n",  # aliases
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # an alias bomb: 9^9 strings if expanded
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
    "grid:\n  scheme_options:\n    kdgqa: &x {reference: [*x]}\n",  # a self-referencing value
    "grid: {scheme_options: {kdgqa: {reference: {a: [1, 2]}}}}",
    "false", "0", "''", "---\na: 1\n---\nb: 2\n", "!!python/object:os.system {}",
    "model: {num_heads: 100000000, embed_dim: 100000000}\ngrid: {kv_heads: [100000000]}",
    "model: {num_heads: 4096, embed_dim: 4096}\ngrid: {kv_heads: [4096], schemes: [gqa]}",
    "seed: 18446744073709551616", "grid: {seeds: [-1]}",
    "device: 'cuda:abc'", "uptrain: {lr: .nan}", "uptrain: {epochs: 1e400}",
    "output_dir: \"\\0\"", "output_dir: " + "x" * 5000,
    "data: {name: imagefolder, root: \"\\0\"}",
    "model: {pretrained: 'timm:hf-hub:nobody/nothing'}",
])
def test_hostile_config_documents(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, said = _dry_run(capsys, text)
    if text in ("false", "0", "''"):
        assert status == 2 and "mapping" in said
    if "*" in text:
        assert status == 2 and "YAML aliases" in said  # refused, never expanded
    if "seed" in text or "cuda:abc" in text or "100000000" in text:
        assert status == 2, said  # a real run would fail on it after creating output


def test_largest_valid_seed_serves_batches() -> None:
    from kdgqa.study.data import Batches, ImageTensors

    data = ImageTensors(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4).long())
    batches = Batches(data, 2, image_size=2, seed=2**32 - 1, augment=None)
    assert len(list(batches.epoch(7))) == 2
    assert batches._generator(7, 1).initial_seed() >= 0


SET_VALUES = st.sampled_from(["1", "-1", "0", "3e-4", "1e400", ".nan", "-.inf", "[1, 2]", "[]",
                              "{a: 1}", "x", "", "null", "true", ": :", "[", "&a [*a]",
                              "kdgqa", "cosine", "cpu"])


@st.composite
def experiment_flags(draw: st.DrawFn) -> list[str]:
    args: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        path = draw(_mostly(st.sampled_from(CONFIG_PATHS).map(".".join), TEXT))
        args += ["--set", f"{path}={draw(_mostly(SET_VALUES, TEXT))}"]
    if draw(st.booleans()):
        args += ["--shard", draw(_mostly(st.sampled_from(["0/1", "1/2", "0/4"]),
                                         st.sampled_from(["2/2", "-1/3", "a/b", "0/0", "", "1/",
                                                          f"0/{10**30}"]) | TEXT))]
    if draw(st.booleans()):
        args += ["-o", draw(_mostly(st.sampled_from(["out", "a/b/c", "x" * 300]), TEXT))]
    if draw(st.booleans()):
        args += ["--device", draw(st.sampled_from(["cpu", "auto", "cuda:1", "tpu", "cuda:-1"])
                                  | TEXT)]
    for flag in ("--pretrain-only", "--resume", "--no-progress"):
        if draw(st.booleans()):
            args.append(flag)
    return args


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 3))
@given(args=experiment_flags())
def test_experiment_flags_plan_or_fail_in_one_line(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with _scratch() as folder:
        (folder / "c.yaml").write_text(yaml.safe_dump(BASE))
        status, said = _check_contract(capsys, ["experiment", "c.yaml", "--dry-run", *args])
        assert sorted(p.name for p in folder.iterdir()) == ["c.yaml"], "a dry run wrote files"
    if status == 0:
        assert said.startswith("experiment '"), said


def test_valid_but_huge_study_only_plans(capsys: pytest.CaptureFixture[str]) -> None:
    doc = copy.deepcopy(BASE)
    doc["uptrain"].update(epochs=10**9, batch_size=10**6)
    doc["model"].update(depth=10**6, embed_dim=2**30, num_heads=1024)
    doc["data"].update(image_size=10**6, limit_train=10**12)
    doc["grid"].update(kv_heads=[1, 512, 1024], seeds=list(range(100)))
    status, plan = _dry_run(capsys, yaml.safe_dump(doc))
    assert status == 0 and "= 900 runs" in plan, plan


# ----------------------------------------------------------------------------- convert

@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    save_file(create_timm_vit(**TINY_VIT).state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "model_args": TINY_VIT}))
    return folder / "model.safetensors"


TEXT = st.text(max_size=12)
OPTION_VALUES = st.sampled_from(["1", "0", "-3", "2", "300", "1e999", "-1e999", "NaN",
                                 "Infinity", "true", "false", "null", "[1, 2]", "{}", "0.5",
                                 "1.5", "\"x\"", ""]) | st.integers().map(str) | TEXT
OPTION_KEYS = st.sampled_from(["reference", "min_queries", "window_size", "beta"])


def _mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``common`` four times out of five: most examples get past argument parsing."""
    return st.integers(0, 4).flatmap(lambda n: rare if n == 0 else common)


@st.composite
def convert_args(draw: st.DrawFn) -> list[str]:
    args = ["--scheme", draw(_mostly(st.sampled_from(available_schemes()), TEXT)),
            "--kv-heads", draw(_mostly(st.sampled_from(["1", "2", "3", "4", "6"]),
                                       st.sampled_from(["0", "-1", "7", str(10**30), "two", ""])
                                       | TEXT))]
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        key = draw(_mostly(OPTION_KEYS, st.sampled_from(["window", "", "="])))
        args += ["--option", f"{key}={draw(OPTION_VALUES)}"]
    if draw(st.booleans()):
        args += ["--pooling", draw(_mostly(st.sampled_from(["mean", "first", "random"]),
                                           st.just("max")))]
    if draw(st.booleans()):
        args += ["--format", draw(_mostly(st.sampled_from(["kdgqa", "mha"]), st.just("onnx")))]
    if draw(st.booleans()):
        args += ["--max-shard-size", draw(_mostly(
            st.sampled_from(["40KB", "1", "1.5", "10GB", "9" * 30, "2 GiB"]),
            st.sampled_from(["0", "-1", "1e3MB", "lots"]) | TEXT))]
    if draw(st.integers(0, 3)) == 0:  # small, wrong or mistyped constructor arguments
        key = draw(st.sampled_from(["depth", "num_heads", "embed_dim", "qkv_bias", "bogus"]))
        value = draw(st.sampled_from(["0", "-1", "1", "3", "true", "\"x\"", "[2]", "null"]))
        args += ["--model-arg", f"{key}={value}"]
    return args


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 6))
@given(args=convert_args())
def test_convert_arguments_convert_or_fail_in_one_line(
    args: list[str], source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _scratch() as folder:
        status, said = _check_contract(
            capsys, ["convert", "--model", str(source), "--out", "out", *args])
        if status == 0:
            assert said.startswith("converted "), said
            if "--format" not in args or args[args.index("--format") + 1] == "kdgqa":
                # what convert wrote must load back
                load(folder / "out")
        else:
            assert not (folder / "out").exists()
        assert [p.name for p in folder.iterdir()] in ([], ["out"])  # no temp left
