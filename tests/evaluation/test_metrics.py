"""rag_capg.evaluation.metrics (trec_eval through pytrec_eval, scipy tests) against ranx and a brute-force reference.

ranx is an independent implementation (numba); it breaks score ties by an unstable sort over hashed ids, so
it is compared on tie-free runs. Runs with ties are checked against `brute_force` below: the definitions in
the metrics module docstring written as plain loops, with trec_eval's tie order (score desc, doc id desc).
ranx's numba JIT costs ~40 s on a 2-core box, paid once by the module-scoped `ranx_case` fixture.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from rag_capg.evaluation.metrics import (
    evaluate_run,
    paired_test,
    parse_metric,
    per_query_scores,
    rank_documents,
    recall_curve,
)

METRICS = ["recall@1", "recall@5", "recall@10", "recall@40", "ndcg@1", "ndcg@5", "ndcg@10", "ndcg@40",
           "mrr@1", "mrr@10", "map@5", "map@10", "map@40"]


def random_case(seed: int, *, ties: bool, num_queries: int = 40, num_docs: int = 60, prefix: str = "q"):
    """Random run (30 docs per query, some queries short or empty) and graded qrels (grades 0..3): some
    queries have only grade-0 judgements or none, some relevant documents are never retrieved."""
    rng = random.Random(seed)
    docs = [f"d{i:03d}" for i in range(num_docs)]
    run, qrels = {}, {}
    for q in range(num_queries):
        qid = f"{prefix}{q}"
        depth = rng.choice([0, 3, 8, 30, 30, 30]) if q else 30
        retrieved = rng.sample(docs, depth)
        # ties: scores on a coarse grid, so many documents share a score
        run[qid] = {d: (rng.randint(0, 4) / 4 if ties else rng.random()) for d in retrieved}
        judged = rng.sample(docs, rng.randint(0, 12))
        grades = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        if q % 7 == 3:  # a query whose judgements are all non-relevant
            grades = {d: 0 for d in judged[:3]}
        if q == 1:  # a labelled query the retriever did not answer
            run[qid], grades = {}, {docs[0]: 2}
        qrels[qid] = grades
    return run, qrels


def brute_force(run, qrels, metric: str) -> dict[str, float]:
    """The module docstring's definitions as plain loops, over the queries with a relevant document."""
    family, k = parse_metric(metric)
    out = {}
    for q, grades in qrels.items():
        relevant = {d for d, g in grades.items() if g >= 1}
        if not relevant:
            continue
        # trec_eval order: score descending, then doc id descending
        ranking = [d for d, _ in sorted(run.get(q, {}).items(), key=lambda item: (item[1], item[0]),
                                        reverse=True)][:k]
        if family == "recall":
            out[q] = len(relevant & set(ranking)) / len(relevant)
        elif family == "mrr":
            out[q] = next((1 / i for i, d in enumerate(ranking, 1) if d in relevant), 0.0)
        elif family == "map":
            hits, total = 0, 0.0
            for i, d in enumerate(ranking, 1):
                if d in relevant:
                    hits += 1
                    total += hits / i
            out[q] = total / len(relevant)
        else:
            dcg = sum(grades.get(d, 0) / math.log2(i + 1) for i, d in enumerate(ranking, 1))
            ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
            out[q] = dcg / sum(g / math.log2(i + 1) for i, g in enumerate(ideal, 1))
    return out


@pytest.fixture(scope="module")
def ranx_case():
    """Two tie-free random cases merged (80 queries), evaluated by ranx once for every metric."""
    ranx = pytest.importorskip("ranx")
    run, qrels = random_case(3, ties=False, prefix="a")
    run4, qrels4 = random_case(4, ties=False, prefix="b")
    run.update(run4)
    qrels.update(qrels4)
    # ranx needs every query in both the run and the qrels and at least one judgement per query: keep the
    # judged, answered queries, all-zero-judgement ones included (ranx scores them 0, we exclude them).
    kept = [q for q in qrels if qrels[q] and run[q]]
    r_qrels = ranx.Qrels.from_dict({q: {d: int(g) for d, g in qrels[q].items()} for q in kept})
    r_run = ranx.Run.from_dict({q: run[q] for q in kept})
    per_query = ranx.evaluate(r_qrels, r_run, METRICS, return_mean=False, make_comparable=True)
    order = list(r_qrels.keys())  # ranx returns per-query arrays in its own (sorted) query order
    ref = {m: {q: float(per_query[m][order.index(q)]) for q in kept} for m in METRICS}
    return {q: run[q] for q in kept}, {q: qrels[q] for q in kept}, ref


def test_matches_ranx_on_tie_free_runs_with_graded_qrels(ranx_case):
    run, qrels, ref = ranx_case
    means, ours = evaluate_run(run, qrels, METRICS, return_per_query=True)
    no_relevant = {q for q, g in qrels.items() if not any(v >= 1 for v in g.values())}
    assert no_relevant and len(ours["ndcg@10"]) > 40  # both kinds of query are in the case
    for m in METRICS:
        assert set(ours[m]) == set(qrels) - no_relevant, m  # no-relevant queries excluded ...
        assert all(ref[m][q] == 0.0 for q in no_relevant), m  # ... where ranx scores them 0
        for q in ours[m]:
            assert ours[m][q] == pytest.approx(ref[m][q], abs=1e-9), (m, q)
        assert means[m] == pytest.approx(np.mean([ref[m][q] for q in ours[m]]), abs=1e-12), m


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force_with_ties_empty_runs_and_unretrieved_queries(seed, ties):
    run, qrels = random_case(seed, ties=ties)
    ours = per_query_scores(run, qrels, METRICS)
    assert any(not run[q] and any(g >= 1 for g in qrels[q].values()) for q in qrels)  # labelled, no answer
    for m in METRICS:
        ref = brute_force(run, qrels, m)
        assert len(ref) < len(qrels) and set(ours[m]) == set(ref), m
        for q in ref:
            assert ours[m][q] == pytest.approx(ref[q], abs=1e-9), (m, q)


def test_query_missing_from_run_scores_zero_and_counts_in_the_mean():
    run = {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}
    qrels = {"q1": {"d2": 2, "d3": 1}, "q2": {"x": 1}, "q3": {}, "q4": {"y": 0}}
    means, per_query = evaluate_run(run, qrels, ["ndcg@3", "map@3", "mrr@3", "recall@1"], return_per_query=True)
    # ranking d1 (unjudged), d2 (grade 2), d3 (grade 1); ideal order: 2, 1
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert per_query["ndcg@3"]["q1"] == pytest.approx(dcg / idcg)
    assert per_query["map@3"]["q1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert per_query["mrr@3"] == {"q1": 0.5, "q2": 0.0}  # q3, q4: no relevant document -> excluded
    assert means["ndcg@3"] == pytest.approx(dcg / idcg / 2)


def test_ties_broken_by_doc_id_descending_like_trec_eval():
    assert rank_documents({"a": 1.0, "c": 1.0, "b": 2.0, "d": 0.5}) == ["b", "c", "a", "d"]
    # the relevant "a" loses the tie against "c": rank 2, outside the top 1 and at reciprocal rank 1/2
    run, qrels = {"q": {"a": 1.0, "c": 1.0}}, {"q": {"a": 1}}
    assert evaluate_run(run, qrels, ["recall@1", "mrr@10", "mrr@1"]) == {"recall@1": 0.0, "mrr@10": 0.5,
                                                                         "mrr@1": 0.0}


def test_recall_curve_is_mean_recall_at_every_k():
    run, qrels = random_case(5, ties=True)
    curve = recall_curve(run, qrels, 40)
    assert curve.shape == (40,) and np.all(np.diff(curve) >= 0)
    for k in (1, 5, 17, 40):
        assert curve[k - 1] == pytest.approx(np.mean(list(brute_force(run, qrels, f"recall@{k}").values())))


def test_unknown_metric_rejected():
    for bad in ("ndcg", "precision@10", "ndcg@0", "recall@x"):
        with pytest.raises(ValueError, match="unknown metric"):
            parse_metric(bad)


@pytest.mark.parametrize("method", ["randomization", "t-test"])
def test_paired_test_sanity(method):
    rng = random.Random(0)
    base = {f"q{i}": rng.random() for i in range(100)}
    assert paired_test(base, dict(base), method=method) == 1.0  # identical runs
    better = {q: min(1.0, v + 0.2 + 0.05 * rng.random()) for q, v in base.items()}
    assert paired_test(base, better, method=method, num_permutations=2000) < 0.001
    noise = {q: v + rng.gauss(0, 0.1) for q, v in base.items()}  # no true difference
    assert paired_test(base, noise, method=method, num_permutations=2000) > 0.01
    with pytest.raises(ValueError, match="same queries"):
        paired_test(base, {"other": 1.0}, method=method)


def test_randomization_agrees_with_t_test_on_a_moderate_effect():
    # Both tests estimate the same null; on 200 roughly normal differences their p-values are close.
    rng = random.Random(1)
    base = {f"q{i}": rng.random() for i in range(200)}
    treat = {q: v + 0.03 + rng.gauss(0, 0.2) for q, v in base.items()}
    p_rand = paired_test(base, treat, method="randomization", num_permutations=20_000)
    p_t = paired_test(base, treat, method="t-test")
    assert abs(p_rand - p_t) < 0.02 + 0.2 * p_t


@pytest.mark.parametrize("num_queries, num_permutations", [(10, 20_000), (12, 3_000)])
def test_randomization_p_value_matches_enumerating_every_sign_flip(num_queries, num_permutations):
    # Brute force: all 2^Q sign vectors. 2^10 <= 20,000 draws makes scipy enumerate them too (exact, equal);
    # 3,000 < 2^12 makes it sample, within Monte Carlo error.
    rng = random.Random(num_queries)
    base = {f"q{i}": rng.random() for i in range(num_queries)}
    treat = {q: v + rng.gauss(0.15, 0.2) for q, v in base.items()}
    d = np.array([treat[q] - base[q] for q in sorted(base)])
    flips = np.array(list(itertools.product([-1, 1], repeat=num_queries)))
    exact = float(np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-12))
    p = paired_test(base, treat, method="randomization", num_permutations=num_permutations, seed=3)
    tolerance = 1e-12 if 2 ** num_queries <= num_permutations else \
        4 * (exact * (1 - exact) / num_permutations) ** 0.5 + 2 / num_permutations
    assert p == pytest.approx(exact, abs=tolerance)
