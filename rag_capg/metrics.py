"""Ranking metrics that equal trec_eval / pytrec_eval (and ranx) on the same run, plus paired tests.

A run is ``{query_id: {doc_id: score}}``, qrels are ``{query_id: {doc_id: grade}}``. Metric names are
``recall@k``, ``ndcg@k``, ``mrr@k`` and ``map@k``; the equivalent pytrec_eval measures are ``recall_k``,
``ndcg_cut_k``, ``recip_rank`` on the run cut at k, and ``map_cut_k``; ranx uses the same names as here.

Conventions (each one is checked against pytrec_eval and ranx in tests/test_metrics.py):

- Ranking: score descending, ties broken by doc id *descending* (string order), exactly like trec_eval
  (pytrec_eval). ranx breaks ties by an unstable sort over hashed ids, so it agrees with us only on runs
  without ties; the tests compare it on tie-free runs and pytrec_eval on runs with many ties.
- Relevance: a document is relevant when its grade is >= 1 (trec_eval's ``relevance_level`` 1, ranx's
  ``rel_lvl`` 1). Recall, MRR and MAP are binary; nDCG uses the grade itself as the gain (linear gain,
  Jarvelin & Kekalainen 2002), which is trec_eval's ``ndcg_cut`` and ranx's ``ndcg`` (not the Burges
  2^g - 1 gain of ranx's ``ndcg_burges``):

      DCG@k  = sum_{i=1..k} g(d_i) / log2(i + 1)
      nDCG@k = DCG@k / IDCG@k,     IDCG@k = DCG@k of the judged documents sorted by grade.

- MAP@k divides by the number of relevant documents R (not min(R, k)), as trec_eval's ``map_cut`` and
  ranx's ``map@k`` do: AP@k = (1/R) sum_{i<=k, d_i relevant} precision@i.
- Queries with no relevant document (no qrels entry, or only grade-0 judgements) are *excluded* from the
  means: every metric is 0/0 for them. pytrec_eval skips a query absent from the qrels but scores one with
  only grade-0 judgements as 0; we skip both so that a query set's mean does not depend on whether the
  non-relevant judgements were shipped (ranx scores both as 0, which lowers its mean).
- A query with relevant documents but missing from the run scores 0 on every metric (a retriever that
  returns nothing for a query failed on it); pytrec_eval would silently drop it, ranx raises.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
SignificanceTest = Literal["randomization", "t-test"]

METRIC_FAMILIES = ("recall", "ndcg", "mrr", "map")


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ("ndcg", 10). Raises ValueError on an unknown family or a missing/bad cut-off."""
    family, sep, cut = name.partition("@")
    if family not in METRIC_FAMILIES or not sep or not cut.isdigit() or int(cut) < 1:
        raise ValueError(f"unknown metric {name!r}: expected one of {[f + '@k' for f in METRIC_FAMILIES]}, "
                         f"k >= 1")
    return family, int(cut)


def rank_documents(doc_scores: dict[str, float], depth: int | None = None) -> list[str]:
    """Doc ids in trec_eval order: score descending, ties by doc id descending. Optionally cut at depth."""
    # Python's sort is stable also with reverse=True, so sorting by id then by score gives the
    # lexicographic order (score desc, id desc).
    ids = sorted(doc_scores, reverse=True)
    ids.sort(key=doc_scores.__getitem__, reverse=True)
    return ids if depth is None else ids[:depth]


def _query_metrics(ranked: list[str], grades: dict[str, int], cuts: dict[str, list[int]]) -> dict[str, float]:
    """All requested metrics for one query; ``ranked`` is already in trec_eval order."""
    relevant = {d for d, g in grades.items() if g >= 1}
    num_rel = len(relevant)
    depth = max(k for ks in cuts.values() for k in ks)
    gains = np.array([max(grades.get(d, 0), 0) for d in ranked[:depth]], dtype=np.float64)
    hits = (gains >= 1).astype(np.float64)  # grade >= 1 <=> relevant; gains are integers
    n = len(gains)
    discounts = 1.0 / np.log2(np.arange(2, depth + 2, dtype=np.float64))
    cum_hits = np.cumsum(hits)
    out: dict[str, float] = {}
    for k in cuts.get("recall", []):
        out[f"recall@{k}"] = float(cum_hits[min(k, n) - 1] / num_rel) if n else 0.0
    for k in cuts.get("mrr", []):
        first = np.flatnonzero(hits[:k])
        out[f"mrr@{k}"] = float(1.0 / (first[0] + 1)) if len(first) else 0.0
    for k in cuts.get("map", []):
        m = min(k, n)
        precision_at_hits = (cum_hits[:m] / np.arange(1, m + 1)) * hits[:m]
        out[f"map@{k}"] = float(precision_at_hits.sum() / num_rel)
    if "ndcg" in cuts:
        ideal = np.sort(np.array([g for g in grades.values() if g > 0], dtype=np.float64))[::-1]
        for k in cuts["ndcg"]:
            dcg = float(np.dot(gains[:k], discounts[:min(k, n)]))
            idcg = float(np.dot(ideal[:k], discounts[:min(k, len(ideal))]))
            out[f"ndcg@{k}"] = dcg / idcg
    return out


def per_query_scores(run: Run, qrels: Qrels, metrics: list[str]) -> dict[str, dict[str, float]]:
    """``{metric: {query_id: value}}`` over the queries with at least one relevant document."""
    cuts: dict[str, list[int]] = {}
    for name in metrics:
        family, k = parse_metric(name)
        cuts.setdefault(family, []).append(k)
    depth = max(k for ks in cuts.values() for k in ks)
    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for qid, grades in qrels.items():
        if not any(g >= 1 for g in grades.values()):
            continue
        ranked = rank_documents(run.get(qid, {}), depth)
        values = _query_metrics(ranked, grades, cuts)
        for m in metrics:
            out[m][qid] = values[m]
    return out


def evaluate_run(run: Run, qrels: Qrels, metrics: list[str], *,
                 return_per_query: bool = False) -> dict[str, float] | tuple[dict[str, float], dict]:
    """Mean of each metric over the queries with >= 1 relevant document (see the module docstring).

    With ``return_per_query`` also returns ``{metric: {query_id: value}}`` (for significance tests; its
    key set is the evaluated query set, so ``len(qrels) - len(...)`` queries were excluded).
    """
    per_query = per_query_scores(run, qrels, metrics)
    means = {m: (float(np.mean(list(v.values()))) if v else 0.0) for m, v in per_query.items()}
    return (means, per_query) if return_per_query else means


def paired_test(control: dict[str, float], treatment: dict[str, float], *,
                method: SignificanceTest = "randomization", num_permutations: int = 10_000,
                seed: int = 0) -> float:
    """Two-sided p-value that two systems' per-query scores have the same mean (paired over queries).

    ``randomization``: Fisher's randomisation test (Smucker et al., CIKM 2007). Under H0 the two systems'
    labels are exchangeable per query, i.e. each difference d_q = treatment_q - control_q is equally likely
    to carry either sign; p = (1 + #{|mean(s * d)| >= |mean(d)|}) / (1 + num_permutations) over random sign
    vectors s (the +1 counts the observed assignment, so p is never 0). Identical runs give p = 1.
    ``t-test``: scipy's paired Student t-test; p = 1 when every difference is 0 (t is 0/0 there).
    """
    qids = sorted(control)
    if set(qids) != set(treatment):
        raise ValueError("paired test needs scores for the same queries in both runs")
    if not qids:
        return 1.0
    d = np.array([treatment[q] - control[q] for q in qids], dtype=np.float64)
    if not np.any(np.abs(d) > 1e-12):
        return 1.0
    if method == "t-test":
        from scipy.stats import ttest_rel

        p = float(ttest_rel([treatment[q] for q in qids], [control[q] for q in qids]).pvalue)
        return 1.0 if math.isnan(p) else p
    rng = np.random.default_rng(seed)
    observed = abs(d.mean())
    count, done, chunk = 0, 0, 2_000
    while done < num_permutations:  # chunks keep memory at chunk x Q
        n = min(chunk, num_permutations - done)
        signs = rng.integers(0, 2, size=(n, len(d)), dtype=np.int8) * 2 - 1
        # A tiny tolerance so that float round-off in the mean does not decide ">=" for exact ties.
        count += int(np.sum(np.abs(signs @ d) / len(d) >= observed - 1e-12))
        done += n
    return (1 + count) / (1 + num_permutations)


def recall_curve(run: Run, qrels: Qrels, max_k: int) -> np.ndarray:
    """Mean Recall@k for k = 1..max_k (the recall@k plot), same query set and ranking as evaluate_run."""
    curves = []
    for qid, grades in qrels.items():
        relevant = {d for d, g in grades.items() if g >= 1}
        if not relevant:
            continue
        ranked = rank_documents(run.get(qid, {}), max_k)
        hits = np.array([d in relevant for d in ranked] + [False] * (max_k - len(ranked)), dtype=np.float64)
        curves.append(np.cumsum(hits) / len(relevant))
    return np.mean(curves, axis=0) if curves else np.zeros(max_k)
