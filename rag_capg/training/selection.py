"""Choosing the model to ship without looking at the test split: a dev part held out of the training queries,
and what "better" means on it.

With labels, the dev queries keep their qrels and the checkpoint is chosen on their ESR metric. Without
labels, the judge labels them once, at the start: for each dev query it scores the starting model's top
``pool`` passages and its own top ``num_relevant`` become that query's relevant set (pseudo-qrels). The
checkpoint is then chosen on how well the ESR agrees with the judge: Recall@K of the judge's favourites is
"do they reach the candidate set", nDCG@10 "are they at the top" - the same metrics as with labels, so one
code path serves both. The starting model (step 0) is a candidate like any other: a run that never beats it
ships it unchanged.
"""

from __future__ import annotations

import hashlib

import torch

from rag_capg.retrieval.data import QuerySet


def split_dev(queries: QuerySet, fraction: float, *, max_queries: int | None, seed: int,
              min_queries: int = 5) -> tuple[QuerySet, QuerySet | None]:
    """(training part, dev part) of ``queries``. A query's place depends only on (seed, its id): the order of
    sha256(seed:id) decides, so the split is the same in every process and on every resume, and a query
    keeps its side when others are added. The dev part is round(fraction * n) queries, capped at
    ``max_queries``; None when that is fewer than ``min_queries`` (too few to choose anything on)."""
    n_dev = round(fraction * len(queries))
    if max_queries is not None:
        n_dev = min(n_dev, max_queries)
    if n_dev < min_queries or n_dev >= len(queries):
        return queries, None
    order = sorted(range(len(queries)), key=lambda i: hashlib.sha256(f"{seed}:{queries.ids[i]}".encode()).digest())
    dev = set(order[:n_dev])
    train_idx = [i for i in range(len(queries)) if i not in dev]
    return queries.subset(train_idx), queries.subset(sorted(dev), split="dev")


@torch.no_grad()
def judge_pseudo_qrels(dev: QuerySet, run: dict[str, dict[str, float]], corpus, judge, *,
                       num_relevant: int) -> dict[str, dict[str, int]]:
    """The judge's top ``num_relevant`` of each dev query's pool (``run``: the starting model's top passages),
    graded num_relevant .. 1 by the judge's order, as qrels. A query the judge fails on gets no labels."""
    from rag_capg.evaluation.metrics import rank_documents

    text_of = dict(zip(dev.ids, dev.texts))
    qrels: dict[str, dict[str, int]] = {}
    for qid in dev.ids:
        pool = rank_documents(run[qid])
        s = judge.score([qid], [text_of[qid]], [pool], [[corpus.texts[corpus.index_of[d]] for d in pool]])[0]
        if not torch.isfinite(s).all():
            qrels[qid] = {}
            continue
        top = s.topk(min(num_relevant, len(pool))).indices.tolist()
        qrels[qid] = {pool[j]: num_relevant - r for r, j in enumerate(top)}
    return qrels


def shipped_step(best_step: int, start: dict[str, float], best: dict[str, float], alpha: float) -> tuple[int, float]:
    """The step whose weights final/ holds, and the p-value that decided it.

    The best checkpoint on dev ships only if its per-query dev metric beats the starting model's with a
    paired randomisation test p-value below ``alpha``: on a few dozen dev queries the best of ten noisy
    evaluations is better than the start by chance alone, and shipping it would be silent harm. Otherwise
    (and when the best is the start itself) step 0 ships.
    """
    from rag_capg.evaluation.metrics import paired_test

    if best_step == 0 or not start or set(start) != set(best):
        return 0, 1.0
    p_value = paired_test(start, best)
    return (best_step if p_value < alpha else 0), p_value
