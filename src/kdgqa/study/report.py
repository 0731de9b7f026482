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
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdgqa.errors import KdgqaError
from kdgqa.io.durable import read_jsonl

__all__ = [
    "PairedInterval",
    "SummaryRow",
    "load_jsonl",
    "markdown_table",
    "merge_studies",
    "paired_interval",
    "summarize",
    "write_report",
]


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference (scheme - reference) and its 95 % t-interval over ``n`` pairs."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class SummaryRow:
    scheme: str
    kv_heads: int
    num_heads: int
    n_seeds: int
    acc_mean: float
    acc_std: float
    converted_acc_mean: float
    delta_vs_gqa: PairedInterval | None
    params: int
    kv_cache_bytes_per_token: int
    train_img_per_s: float


def _t975(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


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
    half = _t975(n - 1) * sd / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n)


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


def summarize(rows: Sequence[dict[str, Any]], reference: str = "gqa") -> list[SummaryRow]:
    """One row per (scheme, G), ordered by G then scheme as first seen."""
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    order: list[tuple[str, int]] = []
    for row in rows:
        key = (row["scheme"], int(row["kv_heads"]))
        if key not in cells:
            order.append(key)
        cells[key][int(row["seed"])] = row
    first_seen = {key: i for i, key in enumerate(order)}
    # MHA reference rows first, then by G with the reference scheme first, then in run order.
    order.sort(key=lambda k: (k[0] != "mha", k[1], k[0] != reference, first_seen[k]))
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
        ))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _delta(d: PairedInterval | None) -> str:
    if d is None:
        return "—"
    if not math.isfinite(d.low):
        return f"{100 * d.mean:+.2f} (n=1, no interval)"
    return f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"


def markdown_table(summary: Sequence[SummaryRow]) -> str:
    """The study's headline table (accuracies in %)."""
    lines = [
        "| scheme | KV heads | seeds | test acc % (mean ± std) | Δ vs gqa, same G "
        "(paired 95 % CI) | acc after conversion % | params | KV-cache B/token (bf16) "
        "| train img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r.scheme} | {r.kv_heads}/{r.num_heads} | {r.n_seeds} | "
            f"{_pct(r.acc_mean)} ± {_pct(r.acc_std)} | {_delta(r.delta_vs_gqa)} | "
            f"{_pct(r.converted_acc_mean)} | {r.params:,} | {r.kv_cache_bytes_per_token:,} | "
            f"{r.train_img_per_s:,.0f} |"
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
        d.update({"delta_vs_gqa_mean": delta["mean"] if delta else None,
                  "delta_vs_gqa_low": delta["low"] if delta else None,
                  "delta_vs_gqa_high": delta["high"] if delta else None})
        rows.append(d)
    return rows


def _plots(out: Path, summary: Sequence[SummaryRow], allocation: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(dict.fromkeys(r.scheme for r in summary if r.scheme != "mha"))
    kvs = sorted({r.kv_heads for r in summary if r.scheme != "mha"})
    mha = [r for r in summary if r.scheme == "mha"]

    # Accuracy per scheme, one bar group per G.
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * max(1, len(schemes)), 4))
    width = 0.8 / max(1, len(kvs))
    for j, kv in enumerate(kvs):
        at_kv = {r.scheme: r for r in summary if r.kv_heads == kv and r.scheme != "mha"}
        xs = [i + j * width for i, s in enumerate(schemes) if s in at_kv]
        ax.bar(xs, [100 * at_kv[s].acc_mean for s in schemes if s in at_kv], width,
               yerr=[100 * at_kv[s].acc_std for s in schemes if s in at_kv], capsize=3,
               label=f"G={kv}")
    for r in mha:
        ax.axhline(100 * r.acc_mean, color="k", ls="--", lw=1, label=f"MHA (G={r.kv_heads})")
    ax.set_xticks([i + width * (len(kvs) - 1) / 2 for i in range(len(schemes))], schemes)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy per scheme (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_scheme.png", dpi=120)
    plt.close(fig)

    # Accuracy against KV heads. A study has more schemes than the default colour cycle:
    # 20 colours and a marker per scheme keep every line distinct.
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colour_map, markers = plt.get_cmap("tab20"), "osD^vP<>Xh"
    for i, scheme in enumerate(schemes):
        line = sorted((r for r in summary if r.scheme == scheme), key=lambda r: r.kv_heads)
        ax.errorbar([r.kv_heads for r in line], [100 * r.acc_mean for r in line],
                    yerr=[100 * r.acc_std for r in line], marker=markers[i % len(markers)],
                    color=colour_map(i % 20), capsize=3, label=scheme)
    for r in mha:
        ax.errorbar([r.kv_heads], [100 * r.acc_mean], yerr=[100 * r.acc_std], marker="*",
                    color="k", ms=10, ls="none", label="mha")
    ax.set_xticks(sorted({*kvs, *(r.kv_heads for r in mha)}))
    ax.set_xlabel("KV heads (G)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against KV heads")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_kv_heads.png", dpi=120)
    plt.close(fig)

    # Query heads per KV head, per layer, over training: first seed of each key-driven cell.
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    first_seed: dict[tuple[str, int], int] = {}
    for a in allocation:
        key = (a["scheme"], a["kv_heads"])
        first_seed.setdefault(key, a["seed"])
        if a["seed"] == first_seed[key]:
            runs[a["run_id"]].append(a)
    for run_id, records in runs.items():
        layers = sorted({a["layer"] for a in records})
        cols = min(4, len(layers))
        nrows = math.ceil(len(layers) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 1.0 + 2.6 * nrows),
                                 squeeze=False, sharex=True, sharey=True)
        for ax, layer in zip(axes.flat, layers, strict=False):
            pts = sorted((a for a in records if a["layer"] == layer), key=lambda a: a["step"])
            steps = [a["step"] for a in pts]
            counts = list(zip(*[a["counts"] for a in pts], strict=True))
            ax.stackplot(steps, counts, labels=[f"KV {g}" for g in range(len(counts))],
                         step="post")
            ax.set_title(f"layer {layer}", fontsize=9)
        for ax in axes.flat[len(layers):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7, loc="lower left")
        fig.supxlabel("training step")
        fig.supylabel("query heads per KV head")
        fig.suptitle(f"query-head allocation over training: {run_id}")
        fig.tight_layout()
        fig.savefig(out / f"allocation_{run_id}.png", dpi=110)
        plt.close(fig)


def write_report(out_dir: str | Path) -> str:
    """Write ``report.md``, ``summary.csv``, ``runs.csv`` and plots; return the table."""
    out = Path(out_dir)
    rows = load_jsonl(out / "results.jsonl")
    if not rows:
        raise KdgqaError(f"no results in {out / 'results.jsonl'}")
    summary = summarize(rows)
    table = markdown_table(summary)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    text = [f"# Study {meta.get('name', out.name)}", "", table, "",
            "Accuracy on the test split with the checkpoint chosen on the validation split. "
            "Δ: scheme minus gqa at the same number of KV heads, paired by seed, Student-t "
            "95 % interval. KV-cache bytes per token summed over layers in bf16.", "",
            f"Device: {meta.get('device', '?')} x {meta.get('world_size', 1)}; "
            f"commit {meta.get('commit', '?')}; {versions}."]
    plots = sorted(p.name for p in out.glob("*.png"))
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "summary.csv", _summary_dicts(summary))
    _plots(out, summary, load_jsonl(out / "allocation.jsonl"))
    plots = sorted(p.name for p in out.glob("*.png"))
    text += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots)]
    (out / "report.md").write_text("\n".join(text) + "\n")
    return table


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
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
    for name, rows in [("results.jsonl", list(results.values())), *extra.items()]:
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / name)
    return write_report(out)
