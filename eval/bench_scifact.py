"""SciFact fine-tuning benchmark (issue 3): ESR Recall@K and nDCG@10 before and after CA-PG, and wall time.

Two phases, so that no hyperparameter is chosen by looking at the test split:

  dev   (--dev): a seeded random share of the TRAIN queries (--dev-fraction, --dev-seed) is held out as a
        dev set. Training sees only the rest: their qrels are written to
        outputs/bench_scifact/splits/train-minus-dev-*.tsv and passed as qrels_file, so the label-oracle LSR
        (and its cache key) never holds a dev label. Before/after is measured on the dev queries.
  final (default): the recipe as is (train split -> test split). Run once, with the config dev chose.

    python eval/bench_scifact.py --dev recipes/scifact_cpu.yaml learning_rate=5e-5 tau=0.1 ...
    python eval/bench_scifact.py recipes/scifact_cpu.yaml output_dir=runs/scifact-final

Every run appends one JSON line to outputs/bench_scifact/results.jsonl (phase, overrides, before, after,
wall time, train/eval query counts) and prints a short table. The recipe's dataset path is read in place
(../shared/data/scifact); nothing from it is copied into the repository.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from rag_capg.cli.train import GROUPS, build_trainer
from rag_capg.config_parsing import parse_config
from rag_capg.retrieval.data import QuerySet, load_corpus, load_queries
from rag_capg.retrieval.inputs import TrainDataArguments

OUT = Path("outputs/bench_scifact")


def dev_split(cfg: TrainDataArguments, fraction: float, seed: int) -> tuple[str, QuerySet]:
    """(qrels file of the training part, dev QuerySet) from the train split of cfg.dataset."""
    corpus = load_corpus(cfg.dataset, corpus_file=cfg.corpus_file)
    full = load_queries(cfg.dataset, cfg.train_split, corpus, queries_file=cfg.queries_file)
    order = list(range(len(full)))
    random.Random(seed).shuffle(order)
    dev_idx = sorted(order[:round(fraction * len(full))])
    dev_ids = {full.ids[i] for i in dev_idx}
    path = OUT / "splits" / f"train-minus-dev-{fraction:g}-seed{seed}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{q}\t{p}\t{g}" for q in full.ids if q not in dev_ids for p, g in full.qrels[q].items()]
    path.write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    dev = QuerySet(ids=[full.ids[i] for i in dev_idx], texts=[full.texts[i] for i in dev_idx],
                   qrels={full.ids[i]: full.qrels[full.ids[i]] for i in dev_idx}, split="dev")
    return str(path), dev


def git_state() -> str:
    """HEAD and whether tracked files differed from it when the run ended (a shared working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def prefill_teacher(trainer) -> float:
    """A bi-encoder LSR touches nearly every passage of a 5K corpus within a few epochs (Gumbel sampling
    explores). The trainer's judge already starts from the teacher's corpus-embedding cache when there is one
    (rag_capg.judges.build.seed_teacher_from_cache); when there is none, encode the whole corpus with the teacher once,
    batched by length, into that cache (reused by every later run) and hand it to the judge. Returns the
    seconds it took (0 when the cache was already there)."""
    from rag_capg.retrieval.retriever import corpus_cache_path, encode_corpus

    teacher, cache = trainer.judge.judge, Path(trainer.args.cache_dir) / "embeddings"
    if corpus_cache_path(teacher.model, trainer.corpus, cache, normalize=True).is_file():
        return 0.0
    t0 = time.time()
    emb = encode_corpus(teacher.model, trainer.corpus, cache_dir=cache, batch_size=64,
                        show_progress=False, normalize=True)
    teacher.add_passage_embeddings(trainer.corpus.ids, emb)
    print(f"teacher passages ready: {emb.shape[0]} in {time.time() - t0:.0f} s", flush=True)
    return time.time() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", action="store_true", help="hold out part of the train split and evaluate on it")
    ap.add_argument("--dev-fraction", type=float, default=0.25)
    ap.add_argument("--dev-seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="free-form label stored with the result")
    args, rest = ap.parse_known_args(argv)
    data, judge_args, cfg = parse_config(GROUPS, rest, prog="bench_scifact")
    dev = None
    if args.dev:
        qrels_file, dev = dev_split(data, args.dev_fraction, args.dev_seed)
        data.qrels_file, data.eval_split = qrels_file, ""  # the test split is not even loaded
    t0 = time.time()
    trainer = build_trainer(data, judge_args, cfg)
    if dev is not None:
        trainer.eval_q = dev
    prefill_s = prefill_teacher(trainer) if judge_args.lsr == "bi_encoder" else None
    summary = trainer.train()
    wall = time.time() - t0
    k = cfg.candidates
    before, after = summary["eval_before"] or {}, summary["eval_after"] or {}
    row = {"phase": "dev" if args.dev else "final", "tag": args.tag, "argv": rest,
           "dev": {"fraction": args.dev_fraction, "seed": args.dev_seed} if args.dev else None,
           "eval_split": "dev" if args.dev else data.eval_split, "train_queries": summary["train_queries"],
           "eval_queries": after.get("queries"), "steps": summary["steps"],
           "before": {m: before.get(m) for m in (f"recall@{k}", "ndcg@10")},
           "after": {m: after.get(m) for m in (f"recall@{k}", "ndcg@10")},
           "train_wall_s": summary["wall_time_s"], "total_wall_s": round(wall, 1),
           "teacher_prefill_s": None if prefill_s is None else round(prefill_s, 1),
           "lsr_cache": summary["lsr_cache"], "output_dir": cfg.output_dir, "git": git_state(),
           "versions": {pkg: importlib.metadata.version(pkg) for pkg in
                        ("torch", "transformers", "sentence-transformers", "accelerate")}}
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{row['phase']} ({row['eval_split']}, {row['eval_queries']} queries; trained on "
          f"{row['train_queries']} queries, {row['steps']} steps, {row['train_wall_s']} s) {' '.join(rest)}")
    for m in (f"recall@{k}", "ndcg@10"):
        print(f"  {m:>10}: {row['before'][m]} -> {row['after'][m]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
