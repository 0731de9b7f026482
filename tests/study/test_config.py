"""Config loading and validation: one precise message per problem, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdgqa.study.config import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    default_config,
    describe_plan,
    load_config,
    parse_config,
    resolve_conversion,
    resolve_scheme,
)


def test_default_config_is_valid_and_plan_lists_the_grid() -> None:
    config = load_config(None)
    assert config.data.name == "digits" and config.pretrain is not None
    from kdgqa.study.data import plan_splits

    plan = describe_plan(config, plan_splits(config.data))
    assert "5 schemes x 2 KV-head counts x 3 seeds = 30 runs" in plan
    assert "train 1,294 (scikit-learn's digits), val 144" in plan
    assert "20 steps" in plan  # 1294 // 64: the last partial batch is dropped in training
    assert "dgqa-ema options: {'window_size': 10}" in plan


def test_plan_lists_only_the_options_and_variants_the_grid_uses() -> None:
    config = load_config(None, ["grid.schemes=[gqa, kdgqa-ref]",
                                "grid.variants={kdgqa-ref: {scheme: kdgqa, reference: true}, "
                                "unused: {scheme: pgqa}}"])
    plan = describe_plan(config)
    assert "variant kdgqa-ref" in plan and "unused" not in plan
    assert "dgqa-ema options" not in plan and "steps" in plan


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(default_config())))
    assert load_config(path) == default_config()


def test_partial_yaml_keeps_defaults_and_can_disable_pretraining(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pretrain: null\nuptrain:\n  epochs: 2\ngrid:\n  seeds: [5]\n")
    config = load_config(path)
    assert config.pretrain is None
    assert config.uptrain.epochs == 2 and config.uptrain.lr == default_config().uptrain.lr
    assert config.grid.seeds == [5]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"uptrain": {"epoch": 3}}, "unknown key 'uptrain.epoch' (did you mean 'epochs'?)"),
        ({"modle": {}}, "unknown key 'modle' (did you mean 'model'?)"),
        ({"uptrain": {"lr": "fast"}}, "uptrain.lr: expected a number, got 'fast'"),
        ({"uptrain": {"epochs": True}}, "uptrain.epochs: expected an integer, got True"),
        ({"uptrain": {"epochs": -1}}, "uptrain.epochs must be >= 1, got -1"),
        ({"uptrain": {"schedule": "cosin"}}, "(did you mean 'cosine'?)"),
        ({"grid": {"kv_heads": [7]}}, "grid.kv_heads: 7 does not fit model.num_heads=6"),
        ({"grid": {"kv_heads": [4]}}, "grid cell gqa G=4"),
        ({"grid": {"schemes": ["kdgqq"]}}, "unknown scheme 'kdgqq' (did you mean 'kdgqa'?)"),
        ({"grid": {"scheme_options": {"dgqa-ema": {"window": 3}}}}, "unknown option 'window'"),
        ({"data": {"name": "imagefolder"}}, "data.root is required"),
        ({"data": {"image_size": 9}}, "must be divisible by model.patch_size=2"),
    ],
)
def test_invalid_configs_name_the_problem(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdgqa.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_rejects_bad_config_in_one_line_without_output(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: out\nuptrain:\n  batchsize: 8\n")
    result = _cli("experiment", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdgqa: error: unknown key 'uptrain.batchsize'")
    assert "did you mean 'batch_size'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_missing_dataset_names_layout_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: out\ndata:\n  name: tiny-imagenet\n  root: {tmp_path / 'nope'}\n")
    result = _cli("experiment", str(path), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "tiny-imagenet-200 layout" in line and "wnids.txt" in line
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_prints_plan_and_writes_nothing(tmp_path: Path) -> None:
    result = _cli("experiment", "--dry-run", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "grid: 5 schemes" in result.stdout and "pretrain: 40 epochs" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_presets_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.name and config.grid.schemes


def test_digits_preset_is_the_embedded_default() -> None:
    preset = load_config(Path(__file__).parents[2] / "configs" / "digits.yaml")
    assert preset == default_config()


def test_pretrain_data_must_share_image_size() -> None:
    with pytest.raises(ConfigError, match=r"pretrain_data\.image_size=32 must equal"):
        parse_config({"pretrain_data": {"name": "tiny-imagenet", "root": "x", "image_size": 32}})


def test_variants_put_one_scheme_in_several_forms_into_one_grid() -> None:
    config = parse_config({"grid": {
        "schemes": ["kdgqa", "kdgqa-ref", "dgqa-ema-ref"],
        "scheme_options": {"dgqa-ema": {"window_size": 7}, "kdgqa-ref": {"min_queries": 1}},
        "variants": {"kdgqa-ref": {"scheme": "kdgqa", "reference": True},
                     "dgqa-ema-ref": {"scheme": "dgqa-ema", "reference": True}}}})
    assert resolve_scheme(config.grid, "kdgqa") == ("kdgqa", {})
    assert resolve_scheme(config.grid, "kdgqa-ref") == (
        "kdgqa", {"reference": True, "min_queries": 1})
    # A variant inherits its scheme's options.
    assert resolve_scheme(config.grid, "dgqa-ema-ref") == (
        "dgqa-ema", {"window_size": 7, "reference": True})
    assert "variant kdgqa-ref" in describe_plan(config)


def test_variants_carry_their_own_pooling_and_alignment() -> None:
    config = parse_config({"grid": {
        "schemes": ["gqa", "gqa-fit", "kdgqa-align"], "pooling": "mean",
        "variants": {"gqa-fit": {"scheme": "gqa", "pooling": "fit"},
                     "kdgqa-align": {"scheme": "kdgqa", "align": True, "gain": 2.0}}}})
    assert resolve_scheme(config.grid, "gqa-fit") == ("gqa", {})
    assert resolve_scheme(config.grid, "kdgqa-align") == ("kdgqa", {"gain": 2.0})
    assert resolve_conversion(config.grid, "gqa") == {"pooling": "mean", "align": False,
                                                      "distill_steps": 0}
    assert resolve_conversion(config.grid, "gqa-fit") == {"pooling": "fit", "align": False,
                                                          "distill_steps": 0}
    assert resolve_conversion(config.grid, "kdgqa-align") == {"pooling": "mean", "align": True,
                                                              "distill_steps": 0}


@pytest.mark.parametrize(("variants", "expected"), [
    ({"x": {"scheme": "gqa", "pooling": "median"}}, "grid.variants.x.pooling must be one of"),
    ({"x": {"scheme": "gqa", "align": "yes"}}, "grid.variants.x.align must be true or false"),
    ({"x": {"scheme": "gqa", "distill_steps": -1}}, "distill_steps must be an integer >= 0"),
    ({"gqa": {"scheme": "kdgqa"}}, "'gqa' is already a scheme name"),
    ({"x": {"scheme": "kdgqq"}}, r"grid.variants.x.scheme must name a scheme.*did you mean 'kdgqa'"),
    ({"x": {"reference": True}}, "grid.variants.x.scheme must name a scheme"),
    ({"x": {"scheme": "kdgqa", "bogus": 1}}, "grid cell x G=2"),
])
def test_bad_variants_name_the_problem(variants: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config({"grid": {"schemes": [*variants], "variants": variants}})


def test_overrides_set_nested_values_as_yaml() -> None:
    raw = apply_overrides({"uptrain": {"lr": 1.0}}, [
        "uptrain.lr=3e-4", "grid.kv_heads=[1]", "pretrain=null", "model.pretrained=a/b"])
    assert raw == {"uptrain": {"lr": 3e-4}, "grid": {"kv_heads": [1]}, "pretrain": None,
                   "model": {"pretrained": "a/b"}}
    config = parse_config(raw)
    assert config.uptrain.lr == 3e-4 and config.grid.kv_heads == [1] and config.pretrain is None


@pytest.mark.parametrize(("item", "expected"), [
    ("uptrain.lr", "expected KEY.PATH=VALUE"),
    ("=3", "expected KEY.PATH=VALUE"),
    ("uptrain..lr=3", "expected KEY.PATH=VALUE"),
    ("uptrain.lr=[", "not valid YAML"),
    ("uptrain.lr.x=1", "'lr' is not a mapping"),
])
def test_bad_overrides_name_the_problem(item: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        apply_overrides({"uptrain": {"lr": 1.0}}, [item])


def test_cli_set_reaches_the_plan(tmp_path: Path) -> None:
    result = _cli("experiment", "--dry-run", "--set", "uptrain.epochs=3", "--set",
                  "grid.schemes=[gqa]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "uptrain: 3 epochs" in result.stdout and "grid: 1 schemes" in result.stdout
    bad = _cli("experiment", "--dry-run", "--set", "uptrain.epochs=-1", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "kdgqa: error: uptrain.epochs must be >= 1, got -1")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_an_error_naming_the_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty"):
        load_config(path)
