"""Step time of each estimator in the paper's synthetic benchmark (1000 users x 1000 items, batch 128).

A "step" is exactly ``rag_capg.simulate.runner.train_step``: sample users, ESR logits over the 1000 items,
Gumbel top-K lists, the LSR's picks, rewards, the surrogate loss, backward and the Adagrad update (the
non-finite checks included). Evaluation is not timed.

Timings on a shared machine drift with whatever else runs, so the estimators are measured in ONE
process and interleaved: every round runs a block of ``--block`` steps of each estimator in turn (a
fresh order each round), and the ratio to TOP1 is taken within each round, then the median over rounds
is reported (with the min..max spread of the per-round ratios). Absolute ms/step is the median of the
per-round block means.

    python eval/bench_step_time_sim.py                         # K=20 with L=1 and L=5, all estimators
    python eval/bench_step_time_sim.py --configs 20:1 --rounds 20 --block 50
    python eval/bench_step_time_sim.py --baseline 593b1e7 --estimators top1 capg capg_exact   # before/after
    python eval/bench_step_time_sim.py --init-std 3       # a sharp policy (see --help)

``--baseline COMMIT`` also times the policy / inclusion / estimators modules of that commit (read with
``git show``, patched into the same ``train_step``), interleaved with the current ones: a before/after
measured in one process. Their ratios are to the baseline's own TOP1.

Reference (the paper's hardware, s per 1K steps, K=20 L=1): V-PG 38.3, CA-PG 42.1, V-PG-SwR 28.0,
TOP1 27.3, i.e. CA-PG / TOP1 = 1.54.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rag_capg.simulate.runner as runner
from rag_capg.pg.estimators import ESTIMATORS
from rag_capg.simulate.env import make_env
from rag_capg.simulate.runner import DEFAULT_LR, TwoTowerESR, train_step

CURRENT = (runner.surrogate_loss, runner.sample_plackett_luce)


def load_baseline(commit: str):
    """(surrogate_loss, sample_plackett_luce) of ``commit``'s policy / inclusion / estimators modules."""
    folder = Path(tempfile.mkdtemp(prefix="capg_baseline_"))
    for name in ("policy", "inclusion", "estimators"):
        src = subprocess.run(["git", "show", f"{commit}:rag_capg/{name}.py"], capture_output=True, text=True,
                             check=True).stdout
        for dep in ("policy", "inclusion"):
            src = src.replace(f"from rag_capg.{dep} import", f"from baseline_{dep} import")
        (folder / f"baseline_{name}.py").write_text(src)
    sys.path.insert(0, str(folder))
    estimators, policy = importlib.import_module("baseline_estimators"), importlib.import_module("baseline_policy")
    return estimators.surrogate_loss, policy.sample_plackett_luce


def make_stepper(env, estimator: str, k: int, num_picks: int, batch_size: int, seed: int, modules=CURRENT,
                 init_std: float = 1.0):
    init_g = torch.Generator().manual_seed(seed)
    train_g = torch.Generator().manual_seed(10_000 + seed)
    esr = TwoTowerESR(env.num_users, env.num_items, 10, init_std, generator=init_g)
    opt = torch.optim.Adagrad(esr.parameters(), lr=DEFAULT_LR[estimator])

    def steps(n: int) -> float:
        runner.surrogate_loss, runner.sample_plackett_luce = modules  # which implementation train_step calls
        t0 = time.perf_counter()
        for _ in range(n):
            reason = train_step(esr, opt, env, estimator=estimator, k=k, num_picks=num_picks, lsr="optimal",
                                temperature=1.0, batch_size=batch_size, generator=train_g)
            if reason is not None:
                raise RuntimeError(f"{estimator}: {reason}")
        return (time.perf_counter() - t0) / n

    return steps


def bench(env, estimators: list[str], k: int, num_picks: int, *, batch_size: int, rounds: int, block: int,
          warmup: int, seed: int, baseline=None, init_std: float = 1.0) -> dict[str, dict[str, float]]:
    steppers = {e: make_stepper(env, e, k, num_picks, batch_size, seed, init_std=init_std) for e in estimators}
    if baseline is not None:
        steppers |= {f"{e} @baseline": make_stepper(env, e, k, num_picks, batch_size, seed, baseline, init_std)
                     for e in estimators}
    for s in steppers.values():
        s(warmup)
    per_round: dict[str, list[float]] = {e: [] for e in steppers}
    order = list(steppers)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for e in order:
            per_round[e].append(steppers[e](block))
    out = {}
    for e in steppers:
        top1 = "top1 @baseline" if e.endswith("@baseline") else "top1"
        ratios = [a / b for a, b in zip(per_round[e], per_round[top1])]
        out[e] = {"ms": 1000 * statistics.median(per_round[e]), "ratio": statistics.median(ratios),
                  "ratio_lo": min(ratios), "ratio_hi": max(ratios)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    ap.add_argument("--configs", nargs="+", default=["20:1", "20:5"], help="K:L pairs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds (each runs a block per estimator)")
    ap.add_argument("--block", type=int, default=40, help="steps per estimator per round")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (0 = torch's default; more than 1 thread on a busy machine can "
                         "be 20x slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-std", type=float, default=1.0,
                    help="std of the ESR's initial embeddings; logits scale with its square: 3 gives the sharp "
                         "policy of late training at high learning rates (logits spanning several hundred nats)")
    ap.add_argument("--baseline", default=None, help="a git commit whose modules to time as well (before/after)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "top1" not in args.estimators:
        args.estimators.append("top1")  # the reference of every ratio

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | python {platform.python_version()}")
    print(f"ESR init std {args.init_std}; batch {args.batch_size}, {args.rounds} interleaved rounds x "
          f"{args.block} steps per estimator (ratio = median over rounds of block time / TOP1's block time in "
          f"the same round)\n")
    baseline = load_baseline(args.baseline) if args.baseline else None
    env = make_env(seed=0)
    for cfg in args.configs:
        k, num_picks = (int(x) for x in cfg.split(":"))
        t0 = time.perf_counter()
        res = bench(env, args.estimators, k, num_picks, batch_size=args.batch_size, rounds=args.rounds,
                    block=args.block, warmup=args.warmup, seed=args.seed, baseline=baseline, init_std=args.init_std)
        print(f"K={k} L={num_picks}  ({time.perf_counter() - t0:.0f} s)")
        print("| estimator | ms/step | s per 1K steps | ratio to TOP1 (median) | per-round range |")
        print("|---|---|---|---|---|")
        for e in res:
            r = res[e]
            print(f"| {e} | {r['ms']:.2f} | {r['ms']:.1f} | {r['ratio']:.2f}x "
                  f"| {r['ratio_lo']:.2f}-{r['ratio_hi']:.2f} |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
