"""CPU step time: one CA-PG optimizer step (query-tower mode, warm LSR cache) against one
sentence-transformers MultipleNegativesRankingLoss (MNRL) step, on the same 32 SciFact training queries.

- CA-PG: rag_capg.training.trainer.CAPGTrainer.optimizer_step() as training runs it -- query encoder forward/backward,
  logits against the cached 5,183-passage index, Gumbel top-K sampling, LSR lookup, surrogate loss,
  clipping, AdamW. The step counter is pinned to 0, so every repetition draws the same 32 queries and the
  same noise; warm-up steps first fill the label-oracle score cache, so the timed steps are cache hits
  (the table reports the hit rate of the timed steps).
- MNRL: the standard set-up as sentence-transformers users train it -- a plain SentenceTransformer (both
  towers, shared weights, dropout on), the 32 queries with one labelled positive passage each, in-batch
  negatives, sentence_transformers MultipleNegativesRankingLoss (scale 20 = 1 / 0.05), clip 1.0, AdamW.

Both run in one process, interleaved (the order alternates every repetition so drift from other jobs on
the machine hits both alike), and each is timed from tokenisation to optimizer.zero_grad.

    python eval/bench_step_time.py [--reps 20] [--warmup 3] [--estimators capg top1 capg_exact] [key=value ...]

key=value overrides go to the CA-PG options (rag-capg train's) (defaults: recipes/scifact_cpu.yaml, batch_size=32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from rag_capg.cli.train import GROUPS, build_trainer
from rag_capg.config_parsing import parse_config


def mnrl_setup(model_name: str, texts: list[str], positives: list[str], lr: float):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import batch_to_device

    from rag_capg.retrieval.retriever import load_encoder

    model = load_encoder(model_name, device="cpu")
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def step() -> None:
        features = [batch_to_device(model.preprocess(t), model.device) for t in (texts, positives)]
        loss = loss_fn(features, labels=None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--estimators", nargs="+", default=["capg"])
    args, rest = ap.parse_known_args(argv)
    data, judge_args, cfg = parse_config(GROUPS, ["recipes/scifact_cpu.yaml", "batch_size=32", "eval_split=",
                                                  "report_to=none",
                                     "progress=false", "output_dir=runs/bench_step_time", *rest],
                       prog="bench_step_time")
    from rag_capg.training.rollout import batch_indices

    trainer = build_trainer(data, judge_args, cfg)
    batch = batch_indices(len(trainer.train_q), cfg.batch_size, 0, cfg.seed)
    qs = trainer.train_q
    texts = [qs.texts[i] for i in batch]
    corpus = trainer.corpus
    positives = [corpus.texts[corpus.index_of[next(iter(qs.qrels[qs.ids[i]]))]] for i in batch]
    mnrl_step = mnrl_setup(data.model, texts, positives, cfg.learning_rate)

    def capg_step(estimator: str):
        def step() -> None:
            trainer.args.estimator = estimator
            trainer.step = 0  # same batch, same noise every time
            trainer.optimizer_step()
        return step

    steps = {f"CA-PG {e}": capg_step(e) for e in args.estimators}
    steps["MNRL (ST)"] = mnrl_step
    for fn in steps.values():  # warm-up: fills the LSR cache, allocator and thread pools
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    hits0, misses0 = trainer.judge.hits, trainer.judge.misses
    names = list(steps)
    for r in range(args.reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    hits, misses = trainer.judge.hits - hits0, trainer.judge.misses - misses0
    ref = statistics.median(times["MNRL (ST)"])
    print(f"\nstep time, batch {cfg.batch_size}, K={cfg.candidates}, mode={cfg.mode}, {args.reps} interleaved reps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; LSR cache hit rate in timed CA-PG steps "
          f"{hits / max(hits + misses, 1):.3f}")
    print("| step | median s | mean s | min s | p25-p75 s | median / MNRL | paired ratio (median) |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        paired = statistics.median(a / b for a, b in zip(ts, times["MNRL (ST)"]))
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.mean(ts):.3f} | {min(ts):.3f} | "
              f"{q[0]:.3f}-{q[2]:.3f} | {statistics.median(ts) / ref:.2f}x | {paired:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
