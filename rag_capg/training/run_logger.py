"""The run folder's logs: metrics.jsonl / metrics.csv (training rows), eval.jsonl, an accelerate tracker
(TensorBoard by default) and curves.png.

Logs are append-only: one line per log call, flushed, so a long run costs the same per row at step 10 as
at step 100,000. A run killed mid-line leaves at most one torn last line; resume rewrites each file once
(atomically) with the rows up to the checkpoint it continues from, dropping that torn line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rag_capg.io import atomic_path, read_log_rows, write_text

TRAIN_FILES = ("metrics.jsonl", "eval.jsonl")


class RunLogger:
    """Writes the logs of the main process; ``log_*`` may be called on every process (others only reach the
    tracker, which accelerate routes to the main process itself)."""

    def __init__(self, out: Path, accelerator, *, report_to: str, progress: bool, eval_split: str | None,
                 k: int):
        self.out, self.acc, self.report_to, self.progress = out, accelerator, report_to, progress
        self.eval_split, self.k = eval_split, k

    def start(self, config: dict, *, resumed_at: int | None) -> None:
        """Write config.yaml; on resume keep the rows up to the checkpoint's step, else start empty logs."""
        import yaml

        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            for name in (*TRAIN_FILES, "metrics.csv"):
                rows = [] if resumed_at is None or name == "metrics.csv" else \
                    [r for r in read_log_rows(self.out / name) if r.get("step", 0) <= resumed_at]
                write_text(self.out / name, "".join(json.dumps(r) + "\n" for r in rows))
            if resumed_at is not None:
                self._rewrite_csv(read_log_rows(self.out / "metrics.jsonl"))
        if self.report_to != "none":
            flat = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
            self.acc.init_trackers("tensorboard" if self.report_to == "tensorboard" else "rag-capg", config=flat)

    def _append(self, name: str, row: dict) -> None:
        with open(self.out / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def _rewrite_csv(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        write_text(self.out / "metrics.csv", buf.getvalue())

    def log_train(self, row: dict) -> None:
        if self.acc.is_main_process:
            self._append("metrics.jsonl", row)
            csv_path = self.out / "metrics.csv"
            with open(csv_path, "a", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
                if csv_path.stat().st_size == 0:
                    writer.writeheader()
                writer.writerow(row)
            if not self.progress:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
        if self.report_to != "none":
            self.acc.log({f"train/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                         step=row["step"])

    def log_eval(self, row: dict) -> None:
        if self.acc.is_main_process:
            self._append("eval.jsonl", row)
            print(f"[eval step {row['step']}] " + " ".join(f"{k}={v}" for k, v in row.items() if "@" in k),
                  flush=True)
        if self.report_to != "none":
            self.acc.log({f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                         step=row["step"])

    def finish(self) -> None:
        if self.acc.is_main_process:
            self.plot()
        if self.report_to != "none":
            self.acc.end_training()

    def plot(self) -> None:
        train_rows, eval_rows = read_log_rows(self.out / "metrics.jsonl"), read_log_rows(self.out / "eval.jsonl")
        if not train_rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("reward_mean", "reward (mean of picks)"), ("loss", "surrogate loss"),
                  ("entropy", "policy entropy (nats)"), ("grad_norm", "grad norm"),
                  ("candidate_recall", "candidate recall vs labels"), ("lsr_hit_rate", "LSR cache hit rate")]
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        steps = [r["step"] for r in train_rows]
        for ax, (key, title) in zip(axes.flat, panels):
            ys = [r.get(key) for r in train_rows]
            ax.plot([s for s, y in zip(steps, ys) if y is not None], [y for y in ys if y is not None])
            ax.set_title(title)
            ax.set_xlabel("step")
        for ax, metric in zip(list(axes.flat)[6:], ("ndcg@10", f"recall@{self.k}")):
            rows = [r for r in eval_rows if metric in r]
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o")
            ax.set_title(f"eval {metric} ({self.eval_split})")
            ax.set_xlabel("step")
        fig.tight_layout()
        with atomic_path(self.out / "curves.png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
