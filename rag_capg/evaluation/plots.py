"""The figures of `rag-capg eval`: mean Recall@k curves of the compared models, and a run folder's training
curves (every numeric series of metrics.jsonl and eval.jsonl against the step). Written atomically, Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from rag_capg.io import atomic_path, read_log_rows


def plot_recall_curves(curves: dict[str, list[float]], target: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("k (log scale)")
    ax.set_ylabel("mean Recall@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_training_curves(run_dir: Path, target: Path) -> bool:
    """One panel per numeric series of metrics.jsonl (train) and eval.jsonl (eval), against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    for fname, prefix in (("metrics.jsonl", "train"), ("eval.jsonl", "eval")):
        for row in read_log_rows(run_dir / fname):
            for key, v in row.items():
                if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    xs, ys = series.setdefault(f"{prefix} {key}", ([], []))
                    xs.append(row["step"])
                    ys.append(v)
    if not series:
        return False
    cols = min(4, len(series))
    rows = (len(series) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (key, (xs, ys)) in zip(axes.flat, series.items()):
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return True
