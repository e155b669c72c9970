"""``rag-capg simulate``: the paper's synthetic benchmark (method doc section 3).

    rag-capg simulate recipes/simulate_quick.yaml
    rag-capg simulate recipes/simulate.yaml steps=40000 seeds=[0,1] output_dir=runs/sim

Runs every (estimator, K, seed), then writes into OUTPUT_DIR (each file atomically):
  values.csv    estimator,K,seed,step,policy_value  (one row per evaluation)
  curves.png    one panel per K, one colour per estimator, oracle (dashed) and 95% of it (dotted)
  summary.json  the config, oracle values and per-run results (steps to 95%, final value, stops)
and prints a table: steps to reach 95% of the oracle, final value, runs stopped by non-finite updates.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError
from rag_capg.io import write_json, write_text
from rag_capg.pg.estimators import Estimator
from rag_capg.simulate.env import make_env
from rag_capg.simulate.plots import LABELS, mean_curve, plot_curves, runs_by_k_and_estimator
from rag_capg.simulate.runner import DEFAULT_LR, RunResult, run, steps_to_fraction


@dataclass
class SimulateConfig:
    """The paper's synthetic two-stage benchmark: train a two-tower ESR online against an oracle LSR."""

    output_dir: str = field(default="runs/simulate", metadata={"help": "folder for values.csv, curves.png, "
                                                                       "summary.json"})
    estimators: list[Estimator] = field(
        default_factory=lambda: ["vpg", "vpg_swr", "capg", "capg_exact", "top1"],
        metadata={"help": "estimators to compare: vpg, vpg_swr, capg, capg_exact, top1"})
    candidates: list[int] = field(default_factory=lambda: [5, 10, 20],
                                  metadata={"help": "candidate list sizes K to compare (one plot panel each)"})
    num_picks: int = field(default=1, metadata={"help": "L, items the LSR picks from each candidate list"})
    lsr: Literal["optimal", "noisy", "uniform", "anti"] = field(
        default="optimal", metadata={"help": "oracle LSR: top-L by expected reward, softmax sampling with "
                                             "lsr_temperature, uniform picks, or bottom-L (adversarial)"})
    lsr_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the noisy LSR, on "
                                                                  "the expected-reward scale (about -10..10)"})
    steps: int = field(default=300_000, metadata={"help": "training steps per run"})
    eval_every: int = field(default=1000, metadata={"help": "evaluate every this many steps"})
    eval_contexts: int = field(default=10_000, metadata={"help": "fresh contexts per evaluation"})
    batch_size: int = field(default=128, metadata={"help": "contexts per step (one candidate list each)"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "training seeds (ESR init, "
                                                                            "sampling, evaluation contexts)"})
    env_seed: int = field(default=0, metadata={"help": "seed of the environment (features, M0, Mz, W)"})
    num_users: int = field(default=1000, metadata={"help": "number of users (contexts)"})
    num_items: int = field(default=1000, metadata={"help": "number of items (the ESR's full softmax)"})
    feature_dim: int = field(default=10, metadata={"help": "dimension of user and item features"})
    num_latents: int = field(default=10, metadata={"help": "hidden latent groups (matrices Mz)"})
    reward_scale: float = field(default=10.0, metadata={"help": "scale of the expected reward"})
    embed_dim: int = field(default=10, metadata={"help": "dimension of the ESR's free embeddings"})
    init_std: float = field(default=1.0, metadata={"help": "std of the ESR's N(0, std^2) initial embeddings"})
    lr_vpg: float = field(default=DEFAULT_LR["vpg"], metadata={"help": "Adagrad learning rate of vpg and "
                                                                         "vpg_swr"})
    lr_capg: float = field(default=DEFAULT_LR["capg"], metadata={"help": "Adagrad learning rate of capg, "
                                                                           "capg_exact and top1"})
    exact_nodes: int = field(default=12, metadata={"help": "quadrature nodes of capg_exact"})
    exact_top_m: int | None = field(default=23, metadata={"help": "capg_exact: the top_m + 1 heaviest items go "
                                                                    "through the exact race, the rest through a "
                                                                    "second-order tail term (none = all items)"})
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata={"help": "where the ESR and env live"})
    num_threads: int = field(default=1, metadata={"help": "torch intra-op CPU threads (0 = torch's default). "
                                                          "The model is tiny, so 1 is fastest, and on a busy "
                                                          "machine more threads are much slower"})
    progress: bool = field(default=True, metadata={"help": "show tqdm progress bars"})

    def __post_init__(self):
        positive = ("num_picks", "steps", "eval_every", "eval_contexts", "batch_size", "num_users", "num_items",
                    "feature_dim", "num_latents", "embed_dim", "exact_nodes")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("lr_vpg", "lr_capg", "lsr_temperature", "init_std"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be > 0, got {getattr(self, name)}", field=name)
        if not self.estimators:
            raise InputError("give at least one estimator", field="estimators")
        if not self.seeds:
            raise InputError("give at least one seed", field="seeds")
        for k in self.candidates:
            if not self.num_picks <= k <= self.num_items:
                raise InputError(f"K={k} must satisfy num_picks ({self.num_picks}) <= K <= num_items "
                                 f"({self.num_items})", field="candidates")
        if not self.candidates:
            raise InputError("give at least one candidate size", field="candidates")
        if self.num_threads < 0:
            raise InputError(f"must be >= 0, got {self.num_threads}", field="num_threads")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise InputError("CUDA is not available on this machine", field="device")

    def lr_for(self, estimator: str) -> float:
        return self.lr_vpg if estimator in ("vpg", "vpg_swr") else self.lr_capg


def summarise(results: list[RunResult], oracle: dict[int, float]) -> list[dict]:
    """One row per (estimator, K): steps to 95% of the oracle (of the mean curve), final value, stops."""
    rows = []
    for k, est, runs in runs_by_k_and_estimator(results, oracle):
        steps, mean, _, _ = mean_curve(runs)
        per_seed = [steps_to_fraction(r.steps, r.values, 0.95 * oracle[k]) for r in runs]
        stopped = [r for r in runs if r.stopped_at is not None]
        rows.append({
            "estimator": est, "K": k, "oracle": oracle[k],
            "steps_to_95": steps_to_fraction(steps.tolist(), mean.tolist(), 0.95 * oracle[k]),
            "steps_to_95_per_seed": per_seed,
            "final_value": sum(r.values[-1] for r in runs) / len(runs),
            "final_fraction_of_oracle": sum(r.values[-1] for r in runs) / len(runs) / oracle[k],
            "runs_stopped": len(stopped), "runs": len(runs),
            "stopped_at": [r.stopped_at for r in stopped],
            "ms_per_step": sum(r.ms_per_step for r in runs) / len(runs),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = "| estimator | K | steps to 95% of oracle | final value (% of oracle) | stopped (non-finite) | ms/step |"
    lines = [header, "|---|---|---|---|---|---|"]
    for row in rows:
        reach = "not reached" if row["steps_to_95"] is None else f"{row['steps_to_95']:,}"
        stops = f"{row['runs_stopped']}/{row['runs']}"
        if row["stopped_at"]:
            stops += " at " + ", ".join(f"{s:,}" for s in row["stopped_at"])
        lines.append(f"| {LABELS.get(row['estimator'], row['estimator'])} | {row['K']} | {reach} | "
                     f"{row['final_value']:.3f} ({100 * row['final_fraction_of_oracle']:.1f}%) | {stops} | "
                     f"{row['ms_per_step']:.2f} |")
    return "\n".join(lines)


def simulate(cfg: SimulateConfig) -> tuple[list[RunResult], dict[int, float], list[dict]]:
    """Run every (estimator, K, seed) of ``cfg``; write values.csv, curves.png and summary.json."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    env = make_env(num_users=cfg.num_users, num_items=cfg.num_items, feature_dim=cfg.feature_dim,
                   num_latents=cfg.num_latents, reward_scale=cfg.reward_scale, seed=cfg.env_seed).to(cfg.device)
    g = torch.Generator(device=cfg.device).manual_seed(cfg.env_seed)
    oracle = {k: env.oracle_value(k, cfg.num_picks, kind=cfg.lsr, temperature=cfg.lsr_temperature, generator=g)
              for k in cfg.candidates}
    results: list[RunResult] = []
    jobs = [(k, est, seed) for k in cfg.candidates for est in cfg.estimators for seed in cfg.seeds]
    outer = tqdm(jobs, desc="runs", disable=not cfg.progress, position=0)
    for k, est, seed in outer:
        outer.set_postfix_str(f"{LABELS[est]} K={k} seed={seed}")
        bar = tqdm(total=cfg.steps, desc=f"{LABELS[est]} K={k}", leave=False, disable=not cfg.progress,
                   position=1, mininterval=1.0)
        res = run(env, estimator=est, k=k, num_picks=cfg.num_picks, lsr=cfg.lsr, temperature=cfg.lsr_temperature,
                  steps=cfg.steps, eval_every=cfg.eval_every, eval_contexts=cfg.eval_contexts,
                  batch_size=cfg.batch_size, lr=cfg.lr_for(est), embed_dim=cfg.embed_dim, init_std=cfg.init_std,
                  seed=seed, exact_nodes=cfg.exact_nodes, exact_top_m=cfg.exact_top_m, device=cfg.device,
                  on_step=lambda s: bar.update(100) if s % 100 == 0 else None)
        bar.close()
        if res.stopped_at is not None:
            tqdm.write(f"{LABELS[est]} K={k} seed={seed}: {res.status()}")
        results.append(res)
    rows = summarise(results, oracle)
    write_outputs(cfg, results, oracle, rows)
    return results, oracle, rows


def values_csv(results: list[RunResult]) -> str:
    """values.csv: one row per (run, evaluation): estimator, K, seed, step, policy_value."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["estimator", "K", "seed", "step", "policy_value"])
    for r in results:
        for s, v in zip(r.steps, r.values):
            writer.writerow([r.estimator, r.k, r.seed, s, f"{v:.6f}"])
    return buf.getvalue()


def write_outputs(cfg: SimulateConfig, results: list[RunResult], oracle: dict[int, float], rows: list[dict]) -> None:
    out = cfg.output_dir
    write_text(f"{out}/values.csv", values_csv(results))
    plot_curves(results, oracle, f"{out}/curves.png",
                title=f"L={cfg.num_picks}, {cfg.lsr} LSR, {len(cfg.seeds)} seed(s), batch {cfg.batch_size}")
    write_json(f"{out}/summary.json", {
        "config": asdict(cfg),
        "oracle": {str(k): v for k, v in oracle.items()},
        "table": rows,
        "runs": [{"estimator": r.estimator, "K": r.k, "seed": r.seed, "status": r.status(),
                  "stopped_at": r.stopped_at, "stop_reason": r.stop_reason, "train_steps": r.train_steps,
                  "final_value": r.values[-1], "ms_per_step": r.ms_per_step} for r in results],
    })


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SimulateConfig, argv, prog="rag-capg simulate")
    _, oracle, rows = simulate(cfg)
    print("oracle value: " + ", ".join(f"K={k}: {v:.3f}" for k, v in oracle.items()))
    print(format_table(rows))
    print(f"wrote {cfg.output_dir}/values.csv, curves.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
