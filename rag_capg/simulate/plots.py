"""Learning curves in the style of the paper's candidate-size figure.

One panel per candidate size K; one colour per estimator; the line is the mean over seeds and the band
spans the seeds' min..max. A run stopped by a non-finite update ends its line where it stopped and is
marked with an x. Dashed: the oracle value of that K; dotted: 95% of it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from rag_capg.io import atomic_path  # noqa: E402
from rag_capg.simulate.runner import RunResult  # noqa: E402

LABELS = {"vpg": "V-PG", "vpg_swr": "V-PG-SwR", "capg": "CA-PG", "capg_exact": "CA-PG-exact", "top1": "TOP1"}
COLOURS = {"vpg": "tab:gray", "vpg_swr": "tab:blue", "capg": "tab:red", "capg_exact": "tab:purple",
           "top1": "tab:orange"}


def runs_by_k_and_estimator(results: list[RunResult], ks) -> list[tuple[int, str, list[RunResult]]]:
    """(K, estimator, its runs over seeds) for each K of ks and each estimator present, estimators in the
    order they first appear; pairs without runs are left out."""
    estimators = list(dict.fromkeys(r.estimator for r in results))
    groups = [(k, est, [r for r in results if r.k == k and r.estimator == est])
              for k in sorted(ks) for est in estimators]
    return [g for g in groups if g[2]]


def mean_curve(runs: list[RunResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, low, high) over seeds, up to the longest run; a stopped seed drops out of later points."""
    longest = max(runs, key=lambda r: len(r.steps))
    steps = np.asarray(longest.steps)
    table = np.full((len(runs), len(steps)), np.nan)
    for i, r in enumerate(runs):
        table[i, : len(r.values)] = r.values
    with np.errstate(all="ignore"):
        return steps, np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)


def plot_curves(results: list[RunResult], oracle: dict[int, float], path: str | Path, *,
                title: str = "") -> None:
    ks = sorted({r.k for r in results})
    estimators = list(dict.fromkeys(r.estimator for r in results))
    # at least 7 inches wide: one panel must still hold the legend row and the title
    fig, axes = plt.subplots(1, len(ks), figsize=(max(4.2 * len(ks), 7.0), 3.6), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for est in estimators:
            runs = [r for r in results if r.k == k and r.estimator == est]
            if not runs:
                continue
            steps, mean, low, high = mean_curve(runs)
            colour = COLOURS.get(est)
            ax.plot(steps, mean, color=colour, label=LABELS.get(est, est), lw=1.6)
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=colour, alpha=0.2, lw=0)
            for r in runs:
                if r.stopped_at is not None and r.values:
                    ax.plot(r.steps[-1], r.values[-1], marker="x", color=colour, ms=7)
        if k in oracle:
            ax.axhline(oracle[k], color="black", ls="--", lw=1.0, label="oracle")
            ax.axhline(0.95 * oracle[k], color="black", ls=":", lw=1.0, label="95% of oracle")
        ax.set_title(f"K = {k}")
        ax.set_xlabel("training steps")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}K" if x else "0"))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("policy value")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
