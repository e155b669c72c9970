"""The figures of `rag-capg eval`: mean Recall@k curves of the compared models, and a run folder's training
curves (every numeric series of metrics.jsonl and eval.jsonl against the step). Written atomically, Agg backend.
"""

from __future__ import annotations

import json
from pathlib import Path

from rag_capg.errors import InputError
from rag_capg.io import atomic_path


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
        path = run_dir / fname
        if not path.is_file():
            continue
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"not JSON: {err.msg}", file=path, line=line_no) from None
            if not isinstance(row, dict) or "step" not in row:
                raise InputError("a row needs a 'step'", file=path, line=line_no, field="step")
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
