"""Ranking metrics computed by trec_eval (through pytrec_eval), plus paired significance tests (scipy).

A run is ``{query_id: {doc_id: score}}``, qrels are ``{query_id: {doc_id: grade}}``. Metric names are
``recall@k``, ``ndcg@k``, ``mrr@k`` and ``map@k`` (ranx's names); this module maps them onto trec_eval's
measures and only adds the two conventions trec_eval leaves to the caller:

    recall@k -> recall_k      ndcg@k -> ndcg_cut_k      map@k -> map_cut_k
    mrr@k    -> recip_rank on the run cut at depth k (trec_eval's recip_rank has no cut-off)

What these measure (trec_eval's definitions; tests/evaluation/test_metrics.py checks them against ranx and against a
brute-force reference):

- Ranking: score descending, ties broken by doc id *descending* (string order). This is trec_eval's order;
  `rank_documents` reproduces it, for writing TREC files and for cutting a run at k before recip_rank.
- Relevance: grade >= 1 (trec_eval's relevance_level 1). Recall, MRR and MAP are binary; nDCG uses the grade
  itself as the gain (linear gain, Jarvelin & Kekalainen 2002; ranx's ``ndcg``, not its ``ndcg_burges``):

      DCG@k  = sum_{i=1..k} g(d_i) / log2(i + 1)
      nDCG@k = DCG@k / IDCG@k,     IDCG@k = DCG@k of the judged documents sorted by grade.

- MAP@k divides by the number of relevant documents R (not min(R, k)): AP@k = (1/R) sum_{i<=k, d_i rel} P@i.

The two conventions we add:

- Queries with no relevant document (no qrels entry, or only grade-0 judgements) are *excluded* from the
  means: every metric is 0/0 for them. trec_eval skips a query absent from the qrels but scores one with only
  grade-0 judgements as 0; we skip both, so that a mean does not depend on whether the non-relevant judgements
  were shipped (ranx scores both as 0, which lowers its mean).
- A query with relevant documents but missing from the run (or with an empty ranking) scores 0 on every
  metric: a retriever that returns nothing failed on that query. trec_eval silently drops it; ranx raises.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
SignificanceTest = Literal["randomization", "t-test"]

METRIC_FAMILIES = ("recall", "ndcg", "mrr", "map")
# trec_eval measure behind each family, except mrr (recip_rank on the cut run, see per_query_scores)
TREC_MEASURE = {"recall": "recall", "ndcg": "ndcg_cut", "map": "map_cut"}


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


def per_query_scores(run: Run, qrels: Qrels, metrics: list[str]) -> dict[str, dict[str, float]]:
    """``{metric: {query_id: value}}`` over the queries with at least one relevant document."""
    import pytrec_eval

    cuts: dict[str, list[int]] = {}
    for name in metrics:
        family, k = parse_metric(name)
        cuts.setdefault(family, []).append(k)
    labelled = {str(q): {str(d): int(g) for d, g in grades.items()}
                for q, grades in qrels.items() if any(g >= 1 for g in grades.values())}
    # Start every labelled query at 0: trec_eval drops those the run does not answer, and they keep the 0.
    out: dict[str, dict[str, float]] = {m: dict.fromkeys(labelled, 0.0) for m in metrics}
    answered = {q: {str(d): float(s) for d, s in run[q].items()} for q in labelled if run.get(q)}
    if not answered:
        return out
    measures = {f"{TREC_MEASURE[f]}.{','.join(map(str, sorted(set(ks))))}" for f, ks in cuts.items() if f != "mrr"}
    if measures:
        result = pytrec_eval.RelevanceEvaluator(labelled, measures).evaluate(answered)
        for name in metrics:
            family, k = parse_metric(name)
            if family != "mrr":
                for q, values in result.items():
                    out[name][q] = values[f"{TREC_MEASURE[family]}_{k}"]
    for k in sorted(set(cuts.get("mrr", []))):
        # MRR@k: the reciprocal rank of the first relevant document if it is within the top k, else 0. Cutting
        # the run at k in trec_eval's own order and asking for recip_rank gives exactly that.
        cut = {q: {d: docs[d] for d in rank_documents(docs, k)} for q, docs in answered.items()}
        result = pytrec_eval.RelevanceEvaluator(labelled, {"recip_rank"}).evaluate(cut)
        for q, values in result.items():
            out[f"mrr@{k}"][q] = values["recip_rank"]
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


def recall_curve(run: Run, qrels: Qrels, max_k: int) -> np.ndarray:
    """Mean Recall@k for k = 1..max_k (the recall@k plot): trec_eval's recall at every cut-off, one call,
    so the curve is the table's Recall@k at every k by construction."""
    per_query = per_query_scores(run, qrels, [f"recall@{k}" for k in range(1, max_k + 1)])
    if not per_query["recall@1"]:
        return np.zeros(max_k)
    return np.array([np.mean(list(per_query[f"recall@{k}"].values())) for k in range(1, max_k + 1)])


def paired_test(control: dict[str, float], treatment: dict[str, float], *,
                method: SignificanceTest = "randomization", num_permutations: int = 10_000,
                seed: int = 0) -> float:
    """Two-sided p-value that two systems' per-query scores have the same mean (paired over queries).

    ``randomization``: Fisher's randomisation test (Smucker et al., CIKM 2007). Under H0 the two systems'
    labels are exchangeable within each query, i.e. each difference d_q = treatment_q - control_q is equally
    likely to carry either sign. scipy.stats.permutation_test(permutation_type="samples") draws those sign
    flips (all 2^Q of them when 2^Q <= num_permutations: an exact test) and compares mean(d) with its null
    distribution; two-sided p = 2 min(P(T <= t), P(T >= t)), which for this symmetric null is
    P(|T| >= |t|). A random test counts the observed assignment (+1 / +1), so p is never 0.
    ``t-test``: scipy's paired Student t-test.
    Identical per-query scores give p = 1 for both (t is 0/0 there).
    """
    from scipy import stats

    qids = sorted(control)
    if set(qids) != set(treatment):
        raise ValueError("paired test needs scores for the same queries in both runs")
    x = np.array([treatment[q] for q in qids], dtype=np.float64)
    y = np.array([control[q] for q in qids], dtype=np.float64)
    if not np.any(np.abs(x - y) > 1e-12):
        return 1.0
    if method == "t-test":
        p = float(stats.ttest_rel(x, y).pvalue)
        return 1.0 if np.isnan(p) else p  # one query: no variance estimate

    def mean_difference(a, b, axis):  # vectorized: a, b are (..., Q) batches of re-signed pairs
        return np.mean(a - b, axis=axis)

    result = stats.permutation_test((x, y), mean_difference, permutation_type="samples", vectorized=True,
                                    n_resamples=num_permutations, batch=2_000, alternative="two-sided",
                                    rng=np.random.default_rng(seed))
    return float(result.pvalue)
