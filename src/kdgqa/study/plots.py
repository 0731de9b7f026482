"""A study's plots: accuracy per scheme, accuracy against KV heads, the paired difference to
gqa with its interval, allocation over training.

Made to be read: axes zoomed to the data with the MHA bound drawn as a line, points with
error bars rather than bars on a cut axis, schemes whose results are identical in every seed
drawn once and labelled ``a = b``, a colour-blind-safe palette (Okabe-Ito, without its yellow)
with a distinct marker per line, legends outside the data and titles that fit. matplotlib's
Agg backend: no display needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdgqa.study.summary import SummaryRow

__all__ = ["PALETTE", "write_plots"]

#: Okabe-Ito's colour-blind-safe colours, darkest first, yellow left out (too light on white).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
MARKERS = "osD^vP<>Xh*p"
LINESTYLES = ("-", "--", "-.", ":")


def _style(index: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``index``-th line: no two lines share all three."""
    return {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)],
            "linestyle": LINESTYLES[(index // len(PALETTE)) % len(LINESTYLES)]}


def _limits(values: list[float], floor: float = 0.0, ceiling: float = 100.0
            ) -> tuple[float, float]:
    """A y range around ``values`` with a margin, inside [floor, ceiling]."""
    low, high = min(values), max(values)
    margin = max(0.5, 0.08 * (high - low))
    return max(floor, low - margin), min(ceiling, high + margin)


def _mha_lines(ax: Any, mha: Sequence[SummaryRow]) -> None:
    for r in mha:
        ax.axhline(100 * r.acc_mean, color="#444444", ls="--", lw=1.2,
                   label=f"MHA bound ({r.kv_heads} KV heads): {100 * r.acc_mean:.2f} %")


def _per_scheme(out: Path, lines: dict[str, list[SummaryRow]], mha: Sequence[SummaryRow],
                kvs: list[int], title: str) -> None:
    import matplotlib.pyplot as plt

    labels = list(lines)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 + 0.9 * len(labels)), 4.6))
    values: list[float] = [100 * r.acc_mean for r in mha]
    offsets = {kv: (j - (len(kvs) - 1) / 2) * 0.18 for j, kv in enumerate(kvs)}
    for j, kv in enumerate(kvs):
        xs, ys, errs = [], [], []
        for i, label in enumerate(labels):
            row = next((r for r in lines[label] if r.kv_heads == kv), None)
            if row is not None:
                xs.append(i + offsets[kv])
                ys.append(100 * row.acc_mean)
                errs.append(100 * row.acc_std)
        values += [y - e for y, e in zip(ys, errs, strict=True)]
        values += [y + e for y, e in zip(ys, errs, strict=True)]
        style = _style(j)
        ax.errorbar(xs, ys, yerr=errs, ls="none", capsize=3, ms=7, color=style["color"],
                    marker=style["marker"], label=f"{kv} KV heads")
    _mha_lines(ax, mha)
    ax.set_xticks(range(len(labels)), [label.replace(" = ", " =\n") for label in labels],
                  fontsize=8, rotation=30 if len(labels) > 6 else 0,
                  ha="right" if len(labels) > 6 else "center")
    ax.set_ylim(*_limits(values))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(out / "accuracy_per_scheme.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _against_kv(out: Path, lines: dict[str, list[SummaryRow]], mha: Sequence[SummaryRow],
                kvs: list[int], title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    values: list[float] = [100 * r.acc_mean for r in mha]
    # Lines side by side around each G, so error bars at the same G do not hide each other.
    spread = 0.06 * (max(kvs) - min(kvs) or 1)
    for i, (label, rows) in enumerate(lines.items()):
        rows = sorted(rows, key=lambda r: r.kv_heads)
        shift = (i - (len(lines) - 1) / 2) * spread / max(1, len(lines) - 1)
        ys = [100 * r.acc_mean for r in rows]
        errs = [100 * r.acc_std for r in rows]
        values += [y - e for y, e in zip(ys, errs, strict=True)]
        values += [y + e for y, e in zip(ys, errs, strict=True)]
        ax.errorbar([r.kv_heads + shift for r in rows], ys, yerr=errs, capsize=3, ms=6,
                    lw=1.4, label=label, **_style(i))
    _mha_lines(ax, mha)
    for r in mha:
        ax.errorbar([r.kv_heads], [100 * r.acc_mean], yerr=[100 * r.acc_std], marker="*",
                    color="#444444", ms=11, capsize=3, ls="none")
    ax.set_xticks(sorted({*kvs, *(r.kv_heads for r in mha)}))
    ax.set_ylim(*_limits(values))
    ax.set_xlabel("KV heads (G)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(out / "accuracy_vs_kv_heads.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _differences(out: Path, lines: dict[str, list[SummaryRow]], mha: Sequence[SummaryRow],
                 kvs: list[int], title: str) -> None:
    """Each scheme minus gqa at the same G with its paired 95 % interval (the table's Δ
    column), one panel per G, sharing the scheme axis: what the study concludes, at a glance.
    The MHA - gqa gap is drawn as a line: the most an allocation could win back."""
    import matplotlib.pyplot as plt

    labels = [label for label, rows in lines.items()
              if any(r.delta_vs_gqa is not None for r in rows)]
    kvs = [kv for kv in kvs if any(r.kv_heads == kv and r.delta_vs_gqa is not None
                                   for label in labels for r in lines[label])]
    if not labels or not kvs:
        return
    fig, axes = plt.subplots(1, len(kvs), figsize=(3.6 * len(kvs) + 2.6, 0.9 + 0.34 * len(labels)),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, kv in zip(axes[0], kvs, strict=True):
        gqa = next((r for r in lines.get("gqa", []) if r.kv_heads == kv), None)
        gaps = [100 * (r.acc_mean - gqa.acc_mean) for r in mha] if gqa is not None else []
        # The x range shows losses up to twice the MHA gap (at least 3.5 points); an arm far
        # beyond is drawn at the edge with its value, so it cannot squeeze the others flat.
        reach = max(3.5, 2 * max(gaps, default=0.0))
        highs = [100 * d.high for label in labels for r in lines[label]
                 if r.kv_heads == kv and (d := r.delta_vs_gqa) is not None
                 and math.isfinite(d.high)]
        low_edge, high_edge = -reach, max([1.0, *(1.15 * g for g in gaps), *highs]) + 0.2
        for i, label in enumerate(labels):
            row = next((r for r in lines[label] if r.kv_heads == kv), None)
            d = row.delta_vs_gqa if row is not None else None
            if row is None or d is None:
                continue
            if row.uneven_share == 0.0:
                ax.plot([0], [i], marker="x", color="#777777", ms=6, ls="none")
                ax.annotate("never moved (= gqa)", (0, i), xytext=(-7, -3), ha="right",
                            textcoords="offset points", fontsize=7, color="#555555")
                continue
            mean = 100 * d.mean
            if mean < low_edge:
                ax.annotate(f"{mean:+.2f}", (low_edge, i), xytext=(14, -3),
                            textcoords="offset points", fontsize=7, color=PALETTE[0])
                ax.plot([low_edge], [i], marker="<", color=PALETTE[0], ms=7, ls="none",
                        clip_on=False)
                continue
            finite = math.isfinite(d.low)
            err = [[mean - max(100 * d.low, low_edge)], [100 * d.high - mean]] if finite else None
            clear = finite and (d.low > 0 or d.high < 0)
            ax.errorbar([mean], [i], xerr=err, fmt="o", capsize=3, ms=5,
                        color=PALETTE[0] if clear else "#777777",
                        mfc=PALETTE[0] if clear else "white")
        ax.axvline(0, color="#444444", lw=1)
        for gap in gaps:
            ax.axvline(gap, color=PALETTE[1], ls="--", lw=1.2, label=f"MHA - gqa: {gap:+.2f}")
        ax.set_xlim(low_edge, high_edge)
        ax.set_title(f"{kv} KV heads", fontsize=9)
        ax.set_xlabel("Δ test accuracy vs gqa (points)")
        ax.grid(axis="x", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left", frameon=False)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.savefig(out / "difference_vs_gqa.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _allocation(out: Path, allocation: list[dict[str, Any]]) -> None:
    """Query heads per KV head, per layer, over training: first seed of each key-driven cell."""
    import matplotlib.pyplot as plt

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
        fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols + 1.0, 1.0 + 2.4 * nrows),
                                 squeeze=False, sharex=True, sharey=True, layout="constrained")
        for ax, layer in zip(axes.flat, layers, strict=False):
            pts = sorted((a for a in records if a["layer"] == layer), key=lambda a: a["step"])
            counts = list(zip(*[a["counts"] for a in pts], strict=True))
            ax.stackplot([a["step"] for a in pts], counts, step="post",
                         labels=[f"KV {g}" for g in range(len(counts))],
                         colors=[PALETTE[g % len(PALETTE)] for g in range(len(counts))])
            ax.set_title(f"layer {layer}", fontsize=9)
        for ax in axes.flat[len(layers):]:
            ax.axis("off")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles[::-1], labels[::-1], fontsize=8, loc="outside right upper",
                   frameon=False)
        fig.supxlabel("training step")
        fig.supylabel("query heads per KV head")
        fig.suptitle(f"query-head allocation over training: {run_id}", fontsize=10)
        fig.savefig(out / f"allocation_{run_id}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def write_plots(out: Path, summary: Sequence[SummaryRow], merged: dict[str, list[str]],
                allocation: list[dict[str, Any]], subject: str = "") -> None:
    """Write the study's PNG plots into ``out``.

    ``merged`` maps each label to the schemes it stands for (``"gqa = kdgqa"``: identical in
    every seed at every G); ``subject`` (e.g. the dataset) goes into the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    mha = [r for r in summary if r.scheme == "mha"]
    by_scheme: dict[str, list[SummaryRow]] = defaultdict(list)
    for r in summary:
        if r.scheme != "mha":
            by_scheme[r.scheme].append(r)
    lines = {label: by_scheme[schemes[0]] for label, schemes in merged.items()}
    kvs = sorted({r.kv_heads for r in summary if r.scheme != "mha"})
    seeds = max((r.n_seeds for r in summary), default=0)
    what = f"{subject}, " if subject else ""
    _per_scheme(out, lines, mha, kvs,
                f"Test accuracy per scheme ({what}mean ± std over {seeds} seeds)")
    _against_kv(out, lines, mha, kvs,
                f"Test accuracy against KV heads ({what}mean ± std over {seeds} seeds)")
    _differences(out, lines, mha, kvs,
                 f"Paired difference to gqa ({what}mean and 95 % interval over {seeds} seeds; "
                 "filled: the interval excludes 0)")
    _allocation(out, allocation)
