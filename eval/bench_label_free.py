"""Label-free benchmark (issue 12): does a judge stronger than the retriever get distilled into it, with no
relevance label used in training?

    python eval/bench_label_free.py --collections scifact cranfield demo --seeds 0 1 2 --write-results
    python eval/bench_label_free.py --collections scifact --methods capg --estimators capg_exact --seeds 0

Every method starts from all-MiniLM-L6-v2 and sees the train split's queries *without their qrels*; the
judge is recipes/label_free.yaml's (BM25 + the starting model's cosine, each standardised over the corpus).
Labels are used only to score the test split. Rows, per collection:

  zero-shot          the base model; its two-stage row is the judge reranking its top-20: the level that
                     distillation aims at
  bm25               bm25s alone (the judge's lexical member), a full-corpus ranking
  capg <estimator>   `rag-capg train label_free` with ignore_train_labels=true (the dev hold-out is labelled
                     by the judge), one job per seed
  distill_kl         sentence-transformers' DistillKLDivLoss, and MarginMSELoss, from the same judge's scores
  margin_mse         on groups of 4 passages drawn from the base model's top-20 per train query (far fewer
                     judge calls than CA-PG: each record holds both counts), 1 epoch, both towers, lr 2e-5
                     (eval/baselines.py);
                     KL: student cosine / 0.05 against judge z-scores / 1 (they are in standard deviations)

Phases, as in bench_collections.py, so that the recipe is not chosen on a test split: `--phase dev` trains on
80% of the train queries and scores the seeded 20% held out (with their labels: the developer's tuning set,
never the trainer's); `--phase test` trains on all of them and scores the test split.

Columns: first stage (ESR nDCG@10 and Recall@20 of the model's own ranking) and two stage (the same judge
reranking the model's top-20, nDCG@10); mean and range over seeds; per seed a paired randomisation test
against zero-shot on the same queries (p < 0.05: worse / better). Records go to
outputs/bench_label_free/<phase>/<job>.json (skipped when present); `--write-results` puts the test table
into eval/RESULTS.md between markers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_collections as bc  # noqa: E402  (one job-file protocol and one zero-shot run for both benches)

ROOT = bc.ROOT
OUT = ROOT / "outputs" / "bench_label_free"
RECIPE = ROOT / "rag_capg" / "recipes" / "label_free.yaml"
MARK = ("<!-- bench_label_free:begin -->", "<!-- bench_label_free:end -->")
DATASETS = {"scifact": str(bc.DATA / "scifact"), "cranfield": str(bc.DATA / "cranfield"), "demo": "demo:stdlib"}
METHODS = ("zeroshot", "bm25", "capg", "distill_kl", "margin_mse")
TOP = 20  # two-stage: the judge reranks each model's top-20


def recipe_options(collection: str, overrides: dict) -> dict:
    import yaml

    options = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    return {**options, "dataset": DATASETS[collection], "eval_split": "",
            **({"max_eval_queries": 500} if collection == "demo" else {}), "ignore_train_labels": True,
            "cache_dir": bc.CACHE, "report_to": "none", "progress": False, "save_every": 0, **overrides}


def the_judge(collection: str, corpus):
    """The recipe's judge behind the shared score cache, as the trainer builds it."""
    from rag_capg.config_parsing import config_from_dict
    from rag_capg.judges.build import JudgeArguments, as_cached_judge, build_judge

    judge_args = config_from_dict(JudgeArguments, {k: v for k, v in recipe_options(collection, {}).items()
                                                   if k in JudgeArguments.__dataclass_fields__})
    return as_cached_judge(build_judge(judge_args, corpus=corpus, cache_dir=bc.CACHE), cache_dir=bc.CACHE)


def metrics_of(run, judge, corpus, queries) -> dict:
    """{metric: {qid: value}}: ESR nDCG@10 / Recall@20 of ``run``, and two-stage nDCG@10 of the judge
    reranking its top-20."""
    from rag_capg.evaluation.evaluate import rerank
    from rag_capg.evaluation.metrics import per_query_scores

    out = per_query_scores(run, queries.qrels, list(bc.METRICS))
    if judge is not None:
        reranked = rerank(judge, run, corpus, queries, TOP)
        out["two_stage_ndcg@10"] = per_query_scores(reranked, queries.qrels, ["ndcg@10"])["ndcg@10"]
    return out


def dense(model, corpus, queries, doc_emb=None) -> dict:
    from rag_capg.evaluation.evaluate import dense_run

    return dense_run(model, corpus, queries, depth=100, similarity="cosine", doc_emb=doc_emb, cache_dir=bc.CACHE)


def bm25_run(corpus, queries) -> dict:
    """bm25s over the corpus (the recipe's BM25 member, its cached index): the top 100 per query."""
    import numpy as np

    from rag_capg.judges.bm25 import BM25Judge

    bm25, run = BM25Judge(corpus, cache_dir=bc.CACHE), {}
    for qid, text in zip(queries.ids, queries.texts):
        s = bm25.bm25_scores(text)
        top = np.argsort(-s, kind="stable")[:100]
        run[qid] = {corpus.ids[j]: float(s[j]) for j in top}
    return run


def judge_groups(judge, queries, candidates, corpus, rng: random.Random, group_size: int = 4):
    """(qid, passage ids, judge scores) per train query: group_size of its top-20 candidates."""
    sampled = [(q, rng.sample(c, group_size)) for q, c in zip(queries.ids, candidates)]
    text_of, groups = dict(zip(queries.ids, queries.texts)), []
    for b in range(0, len(sampled), 16):
        batch = sampled[b:b + 16]
        s = judge.score([q for q, _ in batch], [text_of[q] for q, _ in batch], [ids for _, ids in batch],
                        [[corpus.texts[corpus.index_of[p]] for p in ids] for _, ids in batch])
        groups.extend((q, ids, row) for (q, ids), row in zip(batch, s.tolist()))
    return groups


def run_job(collection: str, method: str, estimator: str | None, seed: int, phase: str, overrides: dict,
            path: Path) -> dict:
    import shutil
    from dataclasses import replace

    import torch

    from rag_capg.retrieval.retriever import load_encoder

    t0 = time.time()
    options = recipe_options(collection, overrides)
    corpus, train, evalq = bc.load_collection(collection, phase)
    train = replace(train, qrels={})  # no label is used in training (ignore_train_labels)
    record = {"collection": collection, "method": method, "estimator": estimator, "seed": seed, "phase": phase,
              "overrides": overrides, "train_queries": len(train), "eval_queries": len(evalq),
              "eval_split": evalq.split}
    if method == "zeroshot":
        record["per_query"] = metrics_of(dense(load_encoder(bc.MODEL), corpus, evalq), the_judge(collection, corpus),
                                         corpus, evalq)
    elif method == "bm25":
        record["per_query"] = metrics_of(bm25_run(corpus, evalq), None, corpus, evalq)
    elif method == "capg":
        from rag_capg.cli.train import GROUPS
        from rag_capg.config_parsing import config_from_dict
        from rag_capg.training.trainer import CAPGTrainer

        shutil.rmtree(path.with_suffix(""), ignore_errors=True)
        _, judge_args, args = config_from_dict(GROUPS, {**options, "estimator": estimator, "seed": seed,
                                                           "output_dir": str(path.with_suffix(""))})
        # dev phase: the labelled tuning queries are the trainer's eval split, logged beside the judge-labelled
        # dev curve (what chose the checkpoint) so that the two can be compared; nothing is chosen on them
        trainer = CAPGTrainer(model=bc.MODEL, judge=judge_args, args=args, corpus=corpus, train_dataset=train,
                              eval_dataset=evalq if phase == "dev" else None)
        summary = trainer.train()
        record["summary"] = {k: summary.get(k) for k in ("steps", "wall_time_s", "selection", "message",
                                                         "lsr_cache", "train_queries")}
        record["curve"] = [json.loads(line) for line in (path.with_suffix("") / "eval.jsonl").open()]
        torch.set_grad_enabled(True)
        # the trainer's judge (behind the same score cache) reranks: no second judge is built
        record["per_query"] = metrics_of(dense(trainer.model, corpus, evalq, doc_emb=trainer.doc_emb), trainer.judge,
                                         corpus, evalq)
    else:  # distill_kl / margin_mse from the same judge's scores
        import baselines as bl

        config = bl.BaselinesConfig(dataset=DATASETS[collection], cache_dir=bc.CACHE, seed=seed, tau=0.05,
                                    teacher_temperature=1.0,
                                    output_dir=str(path.with_suffix("")), methods=[], evaluate=False)
        candidates = bl.mine_candidates(load_encoder(bc.MODEL), corpus, train, config)
        judge, rng = the_judge(collection, corpus), random.Random(seed)
        groups = judge_groups(judge, train, candidates, corpus, rng, config.group_size)
        text_of = dict(zip(train.ids, train.texts))
        passage = lambda pid: corpus.texts[corpus.index_of[pid]]  # noqa: E731
        dataset = bl.kl_dataset(groups, text_of, passage) if method == "distill_kl" else \
            bl.margin_dataset(groups, text_of, passage, rng)
        target = path.with_suffix("") / "model"
        record["summary"] = bl.train("kl_teacher" if method == "distill_kl" else "margin_mse_teacher", dataset,
                                     config, target)
        record["summary"]["judge_calls"] = len(groups) * config.group_size
        record["per_query"] = metrics_of(dense(load_encoder(str(target)), corpus, evalq), judge, corpus, evalq)
    record["wall_s"] = round(time.time() - t0, 1)
    return record


def table(phase: str) -> str:
    from rag_capg.evaluation.metrics import paired_test

    records = bc.load_records_from(OUT / phase)
    columns = ("ndcg@10", "recall@20", "two_stage_ndcg@10")
    lines = ["| collection | method | seeds | ESR nDCG@10 | worse / better | ESR Recall@20 | worse / better | "
             "two-stage nDCG@10 | worse / better | s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for coll in DATASETS:
        rs = [r for r in records if r["collection"] == coll]
        zero = next((r for r in rs if r["method"] == "zeroshot"), None)
        groups: dict[str, list] = {}
        for r in rs:
            groups.setdefault(r["method"] + (f" {r['estimator']}" if r.get("estimator") else "")
                              + (f" {r['tag']}" if r.get("tag") else ""), []).append(r)
        for label in sorted(groups, key=lambda g: (METHODS.index(g.split()[0]), g)):
            cells = []
            for m in columns:
                have = [r for r in groups[label] if m in r["per_query"]]
                if not have:
                    cells += ["", ""]
                    continue
                means = [statistics.mean(r["per_query"][m].values()) for r in have]
                cell = f"{statistics.mean(means):.4f}" + (f" ({min(means):.3f}-{max(means):.3f})"
                                                          if len(means) > 1 else "")
                worse = better = 0
                if zero is not None and label != "zeroshot" and m in zero["per_query"]:
                    for r in have:
                        ref, new = zero["per_query"][m], r["per_query"][m]
                        p = paired_test(ref, new)
                        diff = statistics.mean(new.values()) - statistics.mean(ref.values())
                        worse, better = worse + (p < 0.05 and diff < 0), better + (p < 0.05 and diff > 0)
                cells += [cell, "" if label == "zeroshot" else f"{worse} / {better}"]
            wall = statistics.mean(r["wall_s"] for r in groups[label])
            lines.append(f"| {coll} | {label} | {len(groups[label])} | {' | '.join(cells)} | {wall:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collections", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--estimators", nargs="+", default=["top1", "capg_exact"])
    args, overrides = bc.parse_common(ap, argv, "overrides of the recipe")
    if not args.table_only:
        jobs = []
        for coll in args.collections:
            for method in args.methods:
                if method in ("zeroshot", "bm25"):
                    jobs.append((coll, method, None, 0))
                else:
                    jobs += [(coll, method, est if method == "capg" else None, s) for s in args.seeds
                             for est in (args.estimators if method == "capg" else [None])]
        for coll, method, est, seed in dict.fromkeys(jobs):
            stem = f"{coll}__{method}" + (f"-{args.tag}" if args.tag and method not in ("zeroshot", "bm25") else "")
            stem += (f"__{est}" if est else "") + ("" if method in ("zeroshot", "bm25") else f"__s{seed}")
            path = OUT / args.phase / f"{stem}.json"
            tag = args.tag if method not in ("zeroshot", "bm25") else ""
            if bc.claim(path):
                bc.run_claimed(path, lambda: {**run_job(coll, method, est, seed, args.phase, overrides, path),
                                              "tag": tag})
    text = table(args.phase)
    print(text)
    if args.write_results:
        bc.write_results(text, "python eval/bench_label_free.py " + " ".join(argv), MARK)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
