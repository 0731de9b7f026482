"""Turn a study's ``results.jsonl`` into a table, CSV files and plots.

The table gives, per scheme and KV-head count, test accuracy as mean +- sample standard
deviation over seeds, and the paired difference to ``gqa`` at the same G: runs are paired by
seed (same data order, same augmentation draws), and the 95 % interval is Student's t on the
per-seed differences. Pairing removes the seed-to-seed variation both schemes share, which
is what makes a handful of seeds informative. Plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdgqa.core.apportion import even_counts
from kdgqa.errors import KdgqaError
from kdgqa.io.durable import read_jsonl
from kdgqa.study.plots import write_plots
from kdgqa.study.summary import PairedInterval, SummaryRow

__all__ = [
    "PairedInterval",
    "SummaryRow",
    "holm_significant",
    "identical_schemes",
    "load_jsonl",
    "markdown_table",
    "merge_studies",
    "minimum_detectable_effect",
    "paired_interval",
    "paired_p_value",
    "summarize",
    "uneven_shares",
    "write_report",
]


def paired_interval(values: Sequence[float], reference: Sequence[float]) -> PairedInterval:
    """95 % Student-t interval of the mean of ``values[i] - reference[i]``.

    With one pair the interval is unbounded (``-inf, inf``): one seed says nothing about
    spread, and the table shows that rather than a misleadingly tight number.
    """
    if len(values) != len(reference) or not values:
        raise KdgqaError("paired_interval needs two equally long, non-empty sequences")
    diffs = [a - b for a, b in zip(values, reference, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairedInterval(mean, -math.inf, math.inf, n)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = _t(0.975, n - 1) * sd / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n, sd)


def _t(quantile: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(quantile, df))


def minimum_detectable_effect(summary: Sequence[SummaryRow], power: float = 0.8
                              ) -> dict[int, tuple[float, int]]:
    """Per KV-head count: the smallest true paired difference to the reference this design
    detects with ``power`` in a two-sided 5 % test, and the number of pairs.

    The pair noise ``sd`` is the median over the arms whose differences vary (identical
    arms carry none; a median, because a few erratic arms, such as the paper's reference
    arithmetic, would otherwise set the design's sensitivity for all):
    ``(t_0.975 + t_power) * sd / sqrt(n)`` with ``n - 1`` degrees of freedom.
    """
    pooled: dict[int, list[PairedInterval]] = defaultdict(list)
    for r in summary:
        d = r.delta_vs_gqa
        if d is not None and d.n >= 2 and d.sd > 0:
            pooled[r.kv_heads].append(d)
    out = {}
    for kv, deltas in pooled.items():
        n = min(d.n for d in deltas)
        sd = statistics.median(d.sd for d in deltas)
        out[kv] = ((_t(0.975, n - 1) + _t(power, n - 1)) * sd / math.sqrt(n), n)
    return dict(sorted(out.items()))


def paired_p_value(d: PairedInterval) -> float:
    """Two-sided p-value of the paired t-test behind ``d`` (1.0 with fewer than two pairs;
    0.0 for a difference that is the same non-zero number in every seed)."""
    if d.n < 2:
        return 1.0
    if d.sd == 0:
        return 0.0 if d.mean != 0 else 1.0
    from scipy import stats

    t = abs(d.mean) / (d.sd / math.sqrt(d.n))
    return float(2 * stats.t.sf(t, d.n - 1))


def holm_significant(summary: Sequence[SummaryRow], alpha: float = 0.05
                     ) -> tuple[int, list[SummaryRow]]:
    """The rows whose difference to the reference stays significant when all of the table's
    comparisons are tested together (Holm's step-down, family-wise error ``alpha``), and the
    number of comparisons. A grid of many arms yields some unadjusted 95 % intervals that
    miss zero by chance alone; Holm says which survive that."""
    tested = [(paired_p_value(d), r) for r in summary
              if (d := r.delta_vs_gqa) is not None and d.n >= 2 and not (d.sd == 0 and d.mean == 0)]
    tested.sort(key=lambda pr: pr[0])
    kept = []
    for i, (p, r) in enumerate(tested):
        if p > alpha / (len(tested) - i):
            break
        kept.append(r)
    return len(tested), kept


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (empty list when the file does not exist).

    A last line torn by a crash is ignored; a damaged line raises ``CorruptFileError``.
    """
    return read_jsonl(path)


def uneven_shares(allocation: Sequence[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Per (scheme, G): the share of logged maps that were not the even split (the
    manipulation check of a key-driven arm: 0 means it never moved and is the reference)."""
    totals: dict[tuple[str, int], list[float]] = defaultdict(list)
    for a in allocation:
        counts = [int(c) for c in a["counts"]]
        even = even_counts(sum(counts), len(counts))
        maps = a.get("input_counts") or [{"counts": counts, "share": 1.0}]
        uneven = sum(float(m["share"]) for m in maps
                     if [int(c) for c in m["counts"]] != even)
        totals[(a["scheme"], int(a["kv_heads"]))].append(uneven)
    return {key: sum(v) / len(v) for key, v in totals.items()}


def summarize(rows: Sequence[dict[str, Any]], reference: str = "gqa",
              allocation: Sequence[dict[str, Any]] = (),
              scheme_order: Sequence[str] = ()) -> list[SummaryRow]:
    """One row per (scheme, G), ordered by G, then the reference, then ``scheme_order`` (the
    config's list, so merged shards read like one study), then as first seen;
    ``allocation`` (the study's allocation log) gives key-driven arms their uneven-map
    share."""
    shares = uneven_shares(allocation)
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    order: list[tuple[str, int]] = []
    for row in rows:
        key = (row["scheme"], int(row["kv_heads"]))
        if key not in cells:
            order.append(key)
        cells[key][int(row["seed"])] = row
    first_seen = {key: i for i, key in enumerate(order)}
    rank = {scheme: i for i, scheme in enumerate(dict.fromkeys(scheme_order))}
    # MHA reference rows first, then by G with the reference scheme first, then config order.
    order.sort(key=lambda k: (k[0] != "mha", k[1], k[0] != reference,
                              rank.get(k[0], len(rank)), first_seen[k]))
    out = []
    for scheme, kv in order:
        by_seed = cells[(scheme, kv)]
        runs = [by_seed[s] for s in sorted(by_seed)]
        accs = [r["test_acc"] for r in runs]
        delta = None
        ref = cells.get((reference, kv))
        if ref is not None and scheme != reference:
            seeds = sorted(set(by_seed) & set(ref))
            if seeds:
                delta = paired_interval([by_seed[s]["test_acc"] for s in seeds],
                                        [ref[s]["test_acc"] for s in seeds])
        out.append(SummaryRow(
            scheme=scheme, kv_heads=kv, num_heads=int(runs[0]["num_heads"]), n_seeds=len(runs),
            acc_mean=sum(accs) / len(accs), acc_std=_std(accs),
            converted_acc_mean=sum(r["converted_test_acc"] for r in runs) / len(runs),
            delta_vs_gqa=delta, params=int(runs[0]["params"]),
            kv_cache_bytes_per_token=int(runs[0]["kv_cache_bytes_per_token"]),
            train_img_per_s=sum(r["train_img_per_s"] for r in runs) / len(runs),
            seeds=tuple(sorted(by_seed)), seed_accs=tuple(accs),
            seed_converted_accs=tuple(r["converted_test_acc"] for r in runs),
            new_classifier=all(r.get("classifier") == "reset" for r in runs),
            val_loss_mean=sum(float(r.get("best_val_loss", math.nan)) for r in runs) / len(runs),
            uneven_share=shares.get((scheme, kv)),
        ))
    return out


def _identical_cells(summary: Sequence[SummaryRow], reference: str = "gqa"
                     ) -> list[tuple[int, list[str]]]:
    """(G, schemes) for every group of two or more schemes identical in every seed at G."""
    groups: dict[tuple[int, Any], list[str]] = defaultdict(list)
    for r in summary:
        if r.scheme != "mha":
            groups[(r.kv_heads, r.outcome)].append(r.scheme)
    return [(kv, sorted(s, key=lambda x: x != reference)) for (kv, _), s in groups.items()
            if len(s) > 1]


def identical_schemes(summary: Sequence[SummaryRow], reference: str = "gqa"
                      ) -> dict[str, list[str]]:
    """Schemes whose results are the same in every seed at every KV-head count, merged:
    ``{"gqa = kdgqa = dgqa-ema": ["gqa", "kdgqa", "dgqa-ema"], "pgqa": ["pgqa"], ...}``
    (the reference first, then in table order; MHA left out)."""
    outcomes: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for r in summary:
        if r.scheme != "mha":
            outcomes[r.scheme].append((r.kv_heads, r.outcome))
    groups: dict[tuple[Any, ...], list[str]] = {}
    for scheme, result in outcomes.items():
        groups.setdefault(tuple(sorted(result)), []).append(scheme)
    merged = {}
    for schemes in groups.values():
        schemes.sort(key=lambda s: s != reference)
        merged[" = ".join(schemes)] = schemes
    return merged


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _delta(d: PairedInterval | None) -> str:
    if d is None:
        return "—"
    if not math.isfinite(d.low):
        return f"{100 * d.mean:+.2f} (n=1, no interval)"
    return f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"


def _converted(r: SummaryRow) -> str:
    return "— (new classifier)" if r.new_classifier else _pct(r.converted_acc_mean)


def markdown_table(summary: Sequence[SummaryRow], merge: bool = True,
                   reference: str = "gqa") -> str:
    """The study's headline table (accuracies in %). With ``merge``, schemes whose results
    are identical in every seed at a KV-head count share one row (``gqa = kdgqa``); a
    key-driven arm whose maps never left the even split reads ``= gqa (never moved)``."""
    lines = [
        "| scheme | KV heads | seeds | test acc % (mean ± std) | Δ vs gqa, same G "
        "(paired 95 % CI) | acc after conversion % | val loss | uneven maps % | params "
        "| KV-cache B/token (bf16) | train img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shown: set[tuple[str, int]] = set()
    for r in summary:
        if (r.scheme, r.kv_heads) in shown:
            continue
        same = [o for o in summary if merge and o.kv_heads == r.kv_heads
                and o.outcome == r.outcome and o.scheme != "mha" and r.scheme != "mha"] or [r]
        same.sort(key=lambda o: o.scheme != reference)
        shown |= {(o.scheme, o.kv_heads) for o in same}
        first = same[0]
        if len(same) > 1 and first.scheme == reference:
            delta = f"identical to {reference} in every seed"
        elif first.uneven_share == 0.0:
            delta = f"= {reference} (never moved)"
        else:
            delta = _delta(first.delta_vs_gqa)
        moved = [o.uneven_share for o in same if o.uneven_share is not None]
        uneven = f"{100 * max(moved):.1f}" if moved else "—"
        lines.append(
            f"| {' = '.join(o.scheme for o in same)} | {r.kv_heads}/{r.num_heads} | "
            f"{r.n_seeds} | {_pct(r.acc_mean)} ± {_pct(r.acc_std)} | {delta} | "
            f"{_converted(r)} | {r.val_loss_mean:.4f} | "
            f"{uneven} | "
            f"{r.params:,} | {r.kv_cache_bytes_per_token:,} | {r.train_img_per_s:,.0f} |"
        )
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _summary_dicts(summary: Sequence[SummaryRow]) -> list[dict[str, Any]]:
    rows = []
    for r in summary:
        d = asdict(r)
        delta: dict[str, Any] | None = d.pop("delta_vs_gqa")
        for key in ("seeds", "seed_accs", "seed_converted_accs"):
            d.pop(key)
        d.update({"delta_vs_gqa_mean": delta["mean"] if delta else None,
                  "delta_vs_gqa_low": delta["low"] if delta else None,
                  "delta_vs_gqa_high": delta["high"] if delta else None})
        rows.append(d)
    return rows


def write_report(out_dir: str | Path) -> str:
    """Write ``report.md``, ``summary.csv``, ``runs.csv`` and plots; return the table."""
    out = Path(out_dir)
    rows = load_jsonl(out / "results.jsonl")
    if not rows:
        raise KdgqaError(f"no results in {out / 'results.jsonl'}")
    allocation = load_jsonl(out / "allocation.jsonl")
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    summary = summarize(rows, allocation=allocation,
                        scheme_order=meta.get("scheme_order") or _config_schemes(out))
    merged = identical_schemes(summary)
    table = markdown_table(summary)
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    data = meta.get("data")
    text = [f"# Study {meta.get('name', out.name)}", ""]
    if data:
        text += [f"Data: {data}."]
        if meta.get("pretrain_data"):
            text += [f"Pretraining data: {meta['pretrain_data']}."]
        text += [""]
    if meta.get("command"):
        sources = meta.get("merged_from") or []
        label = (f"Command of the first of {len(sources)} merged parts" if len(sources) > 1
                 else "Command")
        text += [f"{label}: `{meta['command']}`", ""]
    text += [table, "",
             "Columns: *test acc* is the accuracy on the test split of the checkpoint chosen on "
             "the validation split, mean ± sample std over seeds. *Δ vs gqa* is the scheme "
             "minus gqa at the same number of KV heads, paired by seed (same data order and "
             "draws), with a Student-t 95 % interval. *acc after conversion* is the test "
             "accuracy right after conversion, before any uptraining; where every run got a new "
             "classifier for a new task it is chance level by construction and shown as `—`. "
             "*val loss* is the validation loss of the chosen checkpoint; *uneven maps* is, "
             "for key-driven arms, the share of logged (layer, step) maps that left the even "
             "split (0: the arm never moved and is the reference). KV-cache bytes per token are "
             "summed over layers in bf16; *train img/s* is the uptraining throughput."]
    mde = minimum_detectable_effect(summary)
    if mde:
        text += ["", "Power: the smallest true difference to gqa this design detects 80 % of "
                 "the time (two-sided 5 % paired test; pair noise: the median over the arms whose "
                 "differences vary): " + "; ".join(
                     f"{100 * effect:.2f} points at {kv} KV heads ({n} seeds)"
                     for kv, (effect, n) in mde.items()) + "."]
    family, survivors = holm_significant(summary)
    if family > 1:
        text += ["", f"Multiple comparisons: {family} differences to gqa are tested in this "
                 "table; under Holm's correction (family-wise 5 %) "
                 + (", ".join(f"{r.scheme} at {r.kv_heads} KV heads "
                              f"({100 * r.delta_vs_gqa.mean:+.2f})"
                              for r in survivors if r.delta_vs_gqa is not None)
                    + " remain significant"
                    if survivors else "none remains significant")
                 + "; the other intervals that miss zero may be chance."]
    same = _identical_cells(summary)
    if same:
        text += ["", "Rows joined by `=` are schemes with identical results in every seed ("
                 + "; ".join(f"{' = '.join(s)} at {kv} KV heads" for kv, s in same)
                 + "): they trained exactly the same model (a key-driven scheme whose "
                 "allocation never leaves the even split is gqa)."]
    threads, workers = meta.get("cpu_threads"), meta.get("cpu_workers") or 1
    text += ["", f"Device: {meta.get('device', '?')} x {meta.get('world_size', 1)}"
             + (f", {threads} CPU thread(s) per process" if threads else "")
             + (f", grid in {workers} worker processes" if workers > 1 else "")
             + f"; commit {meta.get('commit', '?')}; {versions}."]
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "summary.csv", _summary_dicts(summary))
    subject = str(meta.get("data_name") or "")
    write_plots(out, summary, merged, allocation, subject)
    plots = sorted(p.name for p in out.glob("*.png"))
    text += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots)]
    (out / "report.md").write_text("\n".join(text) + "\n")
    return table


def _config_schemes(directory: Path) -> list[str]:
    """The ``grid.schemes`` list of a study's saved config.yaml (empty if unreadable)."""
    import yaml

    try:
        config = yaml.safe_load((directory / "config.yaml").read_text())
        schemes = config["grid"]["schemes"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    return [str(s) for s in schemes] if isinstance(schemes, list) else []


def merge_studies(sources: Sequence[str | Path], out_dir: str | Path) -> str:
    """Gather the runs of several study directories (e.g. one per GPU, ``--shard``) into
    ``out_dir`` and write its report there; return the table.

    A run id present in two sources must be the same run (same test accuracy), otherwise
    the merge stops with ``ValueError`` before writing anything: a silent choice between
    two different results would make the table unreproducible.
    """
    out = Path(out_dir)
    dirs = [Path(s) for s in sources]
    for d in dirs:
        if not (d / "results.jsonl").is_file():
            raise KdgqaError(f"{str(d)!r} is not a study directory (no results.jsonl)")
    results: dict[str, dict[str, Any]] = {}
    for d in dirs:
        for row in load_jsonl(d / "results.jsonl"):
            old = results.get(row["run_id"])
            if old is not None and old["test_acc"] != row["test_acc"]:
                raise KdgqaError(f"run {row['run_id']!r} appears with different results in "
                                 f"two sources; merge only shards of one study")
            results.setdefault(row["run_id"], row)
    extra: dict[str, list[dict[str, Any]]] = {"allocation.jsonl": [], "history.jsonl": []}
    for name, rows in extra.items():
        seen: set[Any] = set()
        for d in dirs:
            part = [r for r in load_jsonl(d / name) if r.get("run_id") not in seen]
            rows.extend(part)
            seen.update(str(r.get("run_id")) for r in part)
    meta_src = next((d / "meta.json" for d in dirs if (d / "meta.json").is_file()), None)
    out.mkdir(parents=True, exist_ok=True)
    if meta_src is not None and meta_src.resolve() != (out / "meta.json").resolve():
        meta = json.loads(meta_src.read_text())
        meta["merged_from"] = [str(d) for d in dirs]
        meta["scheme_order"] = list(dict.fromkeys(
            scheme for d in dirs for scheme in _config_schemes(d)))
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
    for name, rows in [("results.jsonl", list(results.values())), *extra.items()]:
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / name)
    return write_report(out)
