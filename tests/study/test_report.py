"""Report statistics (paired by seed) and the files a study's report consists of."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kdgqa.study.report import markdown_table, paired_interval, summarize, write_report


def test_paired_interval_matches_student_t() -> None:
    ci = paired_interval([0.3, 0.5, 0.7], [0.2, 0.3, 0.4])  # diffs 0.1, 0.2, 0.3
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert ci.n == 3
    assert ci.mean == pytest.approx(0.2)
    assert ci.low == pytest.approx(0.2 - half) and ci.high == pytest.approx(0.2 + half)


def test_single_pair_has_no_interval() -> None:
    ci = paired_interval([0.5], [0.4])
    assert ci.mean == pytest.approx(0.1) and math.isinf(ci.low) and math.isinf(ci.high)


def _row(scheme: str, kv: int, seed: int, acc: float) -> dict:
    return {"run_id": f"{scheme}-g{kv}-s{seed}", "scheme": scheme, "kv_heads": kv,
            "num_heads": 4, "seed": seed, "test_acc": acc, "converted_test_acc": acc / 2,
            "params": 100, "kv_cache_bytes_per_token": 64 * kv, "train_img_per_s": 10.0}


def test_summary_pairs_by_seed_not_by_order() -> None:
    rows = [_row("gqa", 2, 0, 0.50), _row("gqa", 2, 1, 0.70), _row("gqa", 2, 2, 0.60),
            # kdgqa in another order, and seed 2 missing: pairs are (0, 1) only.
            _row("kdgqa", 2, 1, 0.75), _row("kdgqa", 2, 0, 0.52), _row("mha", 4, 0, 0.9)]
    summary = {(r.scheme, r.kv_heads): r for r in summarize(rows)}
    assert summarize(rows)[0].scheme == "mha"
    kd = summary[("kdgqa", 2)]
    assert kd.delta_vs_gqa is not None and kd.delta_vs_gqa.n == 2
    assert kd.delta_vs_gqa.mean == pytest.approx(0.035)
    assert summary[("gqa", 2)].delta_vs_gqa is None
    assert summary[("gqa", 2)].acc_std == pytest.approx(0.1)
    table = markdown_table(list(summary.values()))
    assert "| kdgqa | 2/4 | 2 | 63.50 ± 16.26 | +3.50 [" in table


def test_write_report_creates_table_csv_and_plots(tmp_path: Path) -> None:
    # kdgqa equals gqa in every seed at G = 2 (one merged row), not at G = 1.
    rows = [_row(s, kv, seed, 0.5 + 0.01 * seed + 0.02 * kv + (0.03 if (s, kv) == ("kdgqa", 1)
                                                                else 0.0))
            for s in ("gqa", "kdgqa") for kv in (1, 2) for seed in (0, 1)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    alloc = [{"run_id": "kdgqa-g2-s0", "scheme": "kdgqa", "kv_heads": 2, "seed": 0,
              "step": step, "layer": layer, "counts": [1 + step % 2, 3 - step % 2]}
             for step in range(4) for layer in range(2)]
    (tmp_path / "allocation.jsonl").write_text("".join(json.dumps(a) + "\n" for a in alloc))
    table = write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report.count("| kdgqa |") == 1 and report.count("| gqa = kdgqa | 2/4 |") == 1
    assert "identical to gqa in every seed" in report and "gqa = kdgqa at 2 KV heads" in report
    assert table in report
    with open(tmp_path / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 4 and "delta_vs_gqa_low" in summary[0]
    for name in ("accuracy_per_scheme.png", "accuracy_vs_kv_heads.png",
                 "allocation_kdgqa-g2-s0.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_identical_schemes_merge_only_when_every_seed_and_g_agree() -> None:
    from kdgqa.study.report import identical_schemes

    rows = [_row(s, kv, seed, 0.6 + 0.01 * seed) for s in ("kdgqa", "gqa", "dgqa-ema")
            for kv in (1, 2) for seed in (0, 1)]
    rows[-1]["test_acc"] += 1e-9  # dgqa-ema differs in one seed at one G
    assert identical_schemes(summarize(rows)) == {"gqa = kdgqa": ["gqa", "kdgqa"],
                                                  "dgqa-ema": ["dgqa-ema"]}


def test_plot_axes_are_zoomed_to_the_data() -> None:
    from kdgqa.study.plots import _limits

    low, high = _limits([88.0, 95.5, 94.0])
    assert 85 < low < 88 and 95.5 < high < 98
    assert _limits([0.2, 1.0]) == (0.0, 1.5) and _limits([99.8]) == (99.3, 100.0)


def test_uneven_share_is_the_manipulation_check_of_key_driven_arms() -> None:
    from kdgqa.study.report import uneven_shares

    alloc = [{"scheme": "kdgqa", "kv_heads": 2, "counts": c} for c in ([3, 3], [4, 2], [3, 3],
                                                                       [3, 3])]
    alloc += [{"scheme": "kdgqa-ps", "kv_heads": 2, "counts": [3, 3],
               "input_counts": [{"counts": [3, 3], "share": 0.75},
                                {"counts": [2, 4], "share": 0.25}]}]
    alloc += [{"scheme": "dgqa-ema", "kv_heads": 4, "counts": [2, 2, 1, 1]}]  # H=6, G=4 even
    assert uneven_shares(alloc) == {("kdgqa", 2): 0.25, ("kdgqa-ps", 2): 0.25,
                                    ("dgqa-ema", 4): 0.0}


def test_an_arm_that_never_moved_reads_as_the_reference_not_as_a_delta() -> None:
    rows = [_row("gqa", 2, s, 0.6 + 0.01 * s) for s in range(3)]
    rows += [_row("kdgqa", 2, s, 0.6 + 0.012 * s) for s in range(3)]  # differs by noise only
    alloc = [{"scheme": "kdgqa", "kv_heads": 2, "counts": [2, 2]}]
    table = markdown_table(summarize(rows, allocation=alloc))
    assert "| kdgqa | 2/4 | 3 |" in table and "= gqa (never moved)" in table


def test_minimum_detectable_effect_follows_the_median_pair_noise() -> None:
    from scipy import stats

    from kdgqa.study.report import minimum_detectable_effect

    rows = [_row("gqa", 2, s, 0.5) for s in range(5)]
    rows += [_row("a", 2, s, 0.5 + d) for s, d in enumerate([0.01, -0.01, 0.02, 0.0, -0.02])]
    rows += [_row("b", 2, s, 0.5) for s in range(5)]  # identical to gqa: no pair noise
    rows += [_row("c", 2, s, 0.5 + d) for s, d in enumerate([0.3, -0.3, 0.2, 0.0, -0.2])]
    rows += [_row("e", 2, s, 0.5 + d) for s, d in enumerate([0.001, 0.0, 0.002, 0.0, -0.001])]
    mde = minimum_detectable_effect(summarize(rows))
    sd = float(np.std([0.01, -0.01, 0.02, 0.0, -0.02], ddof=1))  # the median of a, c, e
    expected = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / math.sqrt(5)
    assert mde == {2: (pytest.approx(expected), 5)}


def test_paired_p_value_is_student_t_two_sided() -> None:
    from kdgqa.study.report import paired_p_value

    ci = paired_interval([0.3, 0.5, 0.7], [0.2, 0.3, 0.4])  # diffs 0.1, 0.2, 0.3: t = 2 sqrt(3)
    from scipy import stats

    assert paired_p_value(ci) == pytest.approx(2 * stats.t.sf(2 * math.sqrt(3), 2))
    assert paired_p_value(paired_interval([0.5], [0.4])) == 1.0


def test_holm_keeps_only_what_survives_the_family() -> None:
    from kdgqa.study.report import holm_significant

    # Three arms against gqa over 5 seeds: a large steady gain, a small one whose unadjusted
    # p-value is below 5 % but above 5 %/2 (Holm's second threshold), and noise.
    gqa = [0.50, 0.52, 0.49, 0.51, 0.50]
    big = [a + d for a, d in zip(gqa, [0.050, 0.051, 0.049, 0.050, 0.052], strict=True)]
    small = [a + d for a, d in zip(gqa, [0.004, 0.010, 0.000, 0.008, 0.004], strict=True)]
    noise = [a + d for a, d in zip(gqa, [0.01, -0.01, 0.02, -0.02, 0.0], strict=True)]
    rows = [_row(name, 2, seed, acc[seed]) for name, acc in
            (("gqa", gqa), ("big", big), ("small", small), ("noise", noise))
            for seed in range(5)]
    summary = summarize(rows)
    by = {r.scheme: r for r in summary}
    from kdgqa.study.report import paired_p_value

    assert by["small"].delta_vs_gqa is not None
    assert 0.05 / 2 < paired_p_value(by["small"].delta_vs_gqa) < 0.05
    family, kept = holm_significant(summary)
    assert family == 3 and [r.scheme for r in kept] == ["big"]


def test_merged_shards_read_in_config_order(tmp_path: Path) -> None:
    from kdgqa.study.report import merge_studies

    # Two shards that finished in the opposite order of the config's scheme list.
    order = ["gqa", "zeta", "alpha"]
    for i, schemes in enumerate((["alpha"], ["gqa", "zeta"])):
        d = tmp_path / f"shard{i}"
        d.mkdir()
        rows = [_row(s, 2, seed, 0.5 + 0.01 * seed + 0.001 * len(s)) for s in schemes
                for seed in (0, 1)]
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "config.yaml").write_text(f"grid:\n  schemes: {order}\n")
        (d / "meta.json").write_text(json.dumps({"name": "s", "command": f"kdgqa shard {i}"}))
    table = merge_studies([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == order
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "Command of the first of 2 merged parts: `kdgqa shard 0`" in report
    assert (tmp_path / "merged" / "difference_vs_gqa.png").read_bytes()[:4] == b"\x89PNG"
