"""The paper's candidate-size figure on the synthetic benchmark (method doc section 3), resumable.

K = 5, 10, 20; V-PG, V-PG-SwR, CA-PG, CA-PG-exact, TOP1; L = 1 optimal LSR; Adagrad, batch 128, the
paper's learning rates (0.1 for vpg / vpg_swr, 0.01 for capg / capg_exact / top1); evaluation every
1,000 steps on 10,000 fresh contexts. Everything but the horizon is ``rag-capg simulate``'s defaults:
each run is ``rag_capg.simulate.runner.run``, the table is ``rag_capg.simulate.cli.summarise``.

Each (estimator, K, seed) is one job whose result is written atomically to OUT/runs/<job>.json. A
process claims a job before running it (OUT/runs/<job>.claim) and skips finished or claimed ones, so
several processes can share the job list and a restart resumes where it stopped. ``--combine`` writes

    OUT/values.csv   estimator,K,seed,step,policy_value
    OUT/table.md     steps to 95% of the oracle, final value, runs stopped by non-finite updates, ms/step;
                     steps to 70 / 75 / 80 / 85 / 88% of it, the largest fall of a curve between evaluations
    FIGURE (PNG)     one panel per K, one colour per estimator, oracle (dashed), 95% of it (dotted)

    nohup nice -n 5 python eval/bench_simulate.py --steps 5:15000 10:15000 20:30000 > a.log &   # two processes
    nohup nice -n 5 python eval/bench_simulate.py --steps 5:15000 10:15000 20:30000 > b.log &   # share the jobs
    python eval/bench_simulate.py --steps 5:15000 10:15000 20:30000 --combine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rag_capg.io import write_json, write_text
from rag_capg.pg.estimators import ESTIMATORS
from rag_capg.simulate.cli import SimulateConfig, format_table, summarise, values_csv
from rag_capg.simulate.env import make_env
from rag_capg.simulate.plots import LABELS, mean_curve, plot_curves, runs_by_k_and_estimator
from rag_capg.simulate.runner import RunResult, run, steps_to_fraction

ORDER = ["vpg", "vpg_swr", "capg", "capg_exact", "top1"]


def parse_steps(items: list[str]) -> dict[int, int]:
    """["5:15000", "20:30000"] -> {5: 15000, 20: 30000}: the horizon of each candidate size K."""
    out = {}
    for item in items:
        k, steps = item.split(":")
        out[int(k)] = int(steps)
    return out


def job_name(estimator: str, k: int, seed: int, steps: int) -> str:
    return f"{estimator}_K{k}_seed{seed}_{steps}steps"


def run_job(cfg: SimulateConfig, env, estimator: str, k: int, seed: int, steps: int, path: Path) -> None:
    t0 = time.perf_counter()
    res = run(env, estimator=estimator, k=k, num_picks=cfg.num_picks, lsr=cfg.lsr, temperature=cfg.lsr_temperature,
              steps=steps, eval_every=cfg.eval_every, eval_contexts=cfg.eval_contexts, batch_size=cfg.batch_size,
              lr=cfg.lr_for(estimator), embed_dim=cfg.embed_dim, init_std=cfg.init_std, seed=seed,
              exact_nodes=cfg.exact_nodes, exact_top_m=cfg.exact_top_m, device=cfg.device,
              on_step=lambda s: print(f"  {path.stem}: step {s:,} ({time.perf_counter() - t0:.0f} s)", flush=True)
              if s % 5000 == 0 else None)
    record = asdict(res) | {"wall_seconds": time.perf_counter() - t0, "machine": platform.machine(),
                            "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(path, record)
    print(f"{path.name}: {res.status()}, final value {res.values[-1]:.3f}, {res.ms_per_step:.2f} ms/step, "
          f"{record['wall_seconds']:.0f} s wall", flush=True)


def claim(path: Path) -> bool:
    """Atomically claim a job for this process (a .claim file holding our pid); a claim whose process is
    gone is taken over. Lets several processes share one job list without running a job twice."""
    lock = path.with_suffix(".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False  # its owner is alive and running it
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def load_results(out: Path, jobs: list[tuple[str, int, int, int]]) -> list[RunResult]:
    results = []
    for est, k, seed, steps in jobs:
        path = out / "runs" / f"{job_name(est, k, seed, steps)}.json"
        if not path.exists():
            print(f"missing {path.name} (not run yet): left out of the figure", file=sys.stderr)
            continue
        record = json.loads(path.read_text())
        fields = {f: record[f] for f in RunResult.__dataclass_fields__}
        results.append(RunResult(**fields))
    return results


def threshold_table(results: list[RunResult], oracle: dict[int, float], fractions=(0.7, 0.75, 0.8, 0.85, 0.88)) -> str:
    """Steps for the mean curve to reach lower fractions of the oracle (the horizon may stop short of
    95%), and the largest fall of the curve between two evaluations (instability shows up there)."""
    head = " | ".join(f"steps to {100 * f:.0f}%" for f in fractions)
    lines = [f"| estimator | K | {head} | largest drop between evaluations |",
             "|---|---|" + "---|" * (len(fractions) + 1)]
    for k, est, runs in runs_by_k_and_estimator(results, oracle):
        steps, mean, _, _ = mean_curve(runs)
        reach = [steps_to_fraction(steps.tolist(), mean.tolist(), f * oracle[k]) for f in fractions]
        drop = max(0.0, *(a - b for a, b in zip(mean[:-1], mean[1:])))
        cells = " | ".join("not reached" if s is None else f"{s:,}" for s in reach)
        lines.append(f"| {LABELS.get(est, est)} | {k} | {cells} | {drop:.3f} |")
    return "\n".join(lines)


def combine(cfg: SimulateConfig, env, out: Path, figure: Path, jobs, title: str) -> str:
    results = load_results(out, jobs)
    g = torch.Generator().manual_seed(cfg.env_seed)
    oracle = {k: env.oracle_value(k, cfg.num_picks, kind=cfg.lsr, generator=g)
              for k in sorted({r.k for r in results})}
    write_text(out / "values.csv", values_csv(results))
    plot_curves(results, oracle, figure, title=title)
    rows = summarise(results, oracle)
    table = format_table(rows) + "\n\n" + threshold_table(results, oracle)
    oracle_line = "oracle value: " + ", ".join(f"K={k}: {v:.3f}" for k, v in oracle.items())
    write_text(out / "table.md", f"{oracle_line}\n\n{table}\n")
    write_json(out / "summary.json", {"oracle": {str(k): v for k, v in oracle.items()}, "table": rows})
    return f"{oracle_line}\n{table}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", nargs="+", default=["5:15000", "10:15000", "20:30000"],
                    help="K:steps, the horizon of each candidate size (the paper: 300000 for every K)")
    ap.add_argument("--estimators", nargs="+", default=ORDER, choices=list(ESTIMATORS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default="runs/bench_simulate", help="per-run JSONs, values.csv, table.md")
    ap.add_argument("--figure", default="eval/figures/simulate_candidate_size.png")
    ap.add_argument("--combine", action="store_true", help="only gather finished runs into CSV, PNG, table")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    horizons = parse_steps(args.steps)
    cfg = SimulateConfig(estimators=args.estimators, candidates=sorted(horizons), seeds=args.seeds,
                         output_dir=args.out, progress=False)
    env = make_env(num_users=cfg.num_users, num_items=cfg.num_items, feature_dim=cfg.feature_dim,
                   num_latents=cfg.num_latents, reward_scale=cfg.reward_scale, seed=cfg.env_seed)
    # the largest K first: it is where the estimators differ most
    jobs = [(est, k, seed, horizons[k]) for k in sorted(horizons, reverse=True) for seed in args.seeds
            for est in args.estimators]
    out = Path(args.out)
    if args.combine:
        title = (f"L={cfg.num_picks}, {cfg.lsr} LSR, batch {cfg.batch_size}, {len(args.seeds)} seed(s); "
                 + ", ".join(f"K={k}: {s:,} steps" for k, s in sorted(horizons.items())))
        print(combine(cfg, env, out, Path(args.figure), jobs, title))
        print(f"wrote {out}/values.csv, {out}/table.md, {args.figure}")
        return 0

    print(f"python {' '.join(sys.argv)}\n{platform.machine()} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} thread(s) | pid {os.getpid()}", flush=True)
    for est, k, seed, steps in jobs:
        path = out / "runs" / f"{job_name(est, k, seed, steps)}.json"
        if path.exists() or not claim(path):
            continue  # finished, or another process is on it
        try:
            run_job(cfg, env, est, k, seed, steps, path)
        finally:
            path.with_suffix(".claim").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
