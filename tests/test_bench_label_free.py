"""eval/bench_label_free.py: its table (means, ranges, per-seed paired tests against zero-shot) from job records,
and the judge-scored groups its distillation baselines train on."""

from __future__ import annotations

import json
import random
import statistics

import torch

from tests.conftest import load_eval_script


def test_table_counts_seeds_significantly_worse_or_better_than_zero_shot(tmp_path, monkeypatch):
    bench = load_eval_script("bench_label_free")
    monkeypatch.setattr(bench, "OUT", tmp_path)
    folder = tmp_path / "test"
    folder.mkdir()
    rng = random.Random(0)
    base = {f"q{i}": rng.random() for i in range(60)}

    def record(name, method, seed, shift, estimator=None):
        values = {q: min(1.0, max(0.0, v + shift(i))) for i, (q, v) in enumerate(base.items())}
        rec = {"collection": "scifact", "method": method, "estimator": estimator, "seed": seed, "tag": "",
               "wall_s": 10.0, "per_query": {"ndcg@10": values, "recall@20": values, "two_stage_ndcg@10": values}}
        (folder / f"{name}.json").write_text(json.dumps(rec))
        return statistics.mean(values.values())

    record("scifact__zeroshot", "zeroshot", 0, lambda i: 0.0)
    means = [record("scifact__capg__top1__s0", "capg", 0, lambda i: 0.3, "top1"),  # every query better
             record("scifact__capg__top1__s1", "capg", 1, lambda i: 0.02 * (-1) ** i, "top1")]  # noise
    (folder / "scifact__capg__top1__s2.json").write_text("{}")  # a job still running: not in the table
    row = next(line for line in bench.table("test").splitlines() if "| capg top1 |" in line)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "2"  # seeds
    assert cells[3] == f"{statistics.mean(means):.4f} ({min(means):.3f}-{max(means):.3f})"
    assert cells[4] == "0 / 1" and cells[8] == "0 / 1"  # one seed significantly better, the noisy one not


def test_judge_groups_hold_the_judges_scores_of_sampled_candidates(tiny_beir_dir):
    from rag_capg.retrieval.data import load_corpus, load_queries

    bench = load_eval_script("bench_label_free")
    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "train", corpus)
    candidates = [corpus.ids[i:i + 20] for i in range(len(queries))]

    class Judge:
        def score(self, query_ids, texts, passage_ids, passages):
            return torch.tensor([[float(len(q) * 100 + corpus.index_of[p]) for p in row]
                                 for q, row in zip(texts, passage_ids)])

    groups = bench.judge_groups(Judge(), queries, candidates, corpus, random.Random(0), group_size=4)
    text_of = dict(zip(queries.ids, queries.texts))
    assert [g[0] for g in groups] == queries.ids
    for (qid, ids, scores), cands in zip(groups, candidates):
        assert len(set(ids)) == 4 and set(ids) <= set(cands)
        assert scores == [float(len(text_of[qid]) * 100 + corpus.index_of[p]) for p in ids]
