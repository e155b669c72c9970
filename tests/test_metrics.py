"""rag_capg.metrics against two independent implementations: pytrec_eval (trec_eval) and ranx."""

from __future__ import annotations

import random

import pytest

from rag_capg.metrics import evaluate_run, paired_test, parse_metric, per_query_scores, rank_documents, recall_curve

METRICS = ["recall@1", "recall@5", "recall@10", "recall@40", "ndcg@1", "ndcg@5", "ndcg@10", "ndcg@40",
           "mrr@1", "mrr@10", "map@5", "map@10", "map@40"]


def random_case(seed: int, *, ties: bool, num_queries: int = 40, num_docs: int = 60):
    """Random run (30 docs per query, some queries short) and graded qrels (grades 0..3), with some queries
    having no relevant document and some relevant documents never retrieved."""
    rng = random.Random(seed)
    docs = [f"d{i:03d}" for i in range(num_docs)]
    run, qrels = {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        depth = rng.choice([0, 3, 8, 30, 30, 30]) if q else 30
        retrieved = rng.sample(docs, depth)
        # ties: scores on a coarse grid, so many documents share a score
        run[qid] = {d: (rng.randint(0, 4) / 4 if ties else rng.random()) for d in retrieved}
        judged = rng.sample(docs, rng.randint(0, 12))
        grades = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        if q % 7 == 3:  # a query whose judgements are all non-relevant
            grades = {d: 0 for d in judged[:3]}
        qrels[qid] = grades
    return run, qrels


def pytrec_reference(run, qrels, metrics):
    """Per-query values from pytrec_eval on the queries that have a relevant document."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    names = {"recall": "recall_{k}", "ndcg": "ndcg_cut_{k}", "map": "map_cut_{k}"}
    out = {m: {} for m in metrics}
    kept = {q: g for q, g in qrels.items() if any(v >= 1 for v in g.values())}
    cuts = sorted({parse_metric(m)[1] for m in metrics})
    full = pytrec_eval.RelevanceEvaluator(
        kept, {f"recall.{','.join(map(str, cuts))}", f"ndcg_cut.{','.join(map(str, cuts))}",
               f"map_cut.{','.join(map(str, cuts))}"})
    res = full.evaluate({q: run[q] for q in kept if run.get(q)})
    for m in metrics:
        family, k = parse_metric(m)
        for q in kept:
            if q not in res:  # pytrec_eval drops queries with an empty run; we score them 0
                out[m][q] = 0.0
            elif family == "mrr":
                # trec_eval's recip_rank has no cut-off: evaluate the run truncated at k (trec_eval order).
                cut_run = {d: run[q][d] for d in rank_documents(run[q], k)}
                rr = pytrec_eval.RelevanceEvaluator({q: kept[q]}, {"recip_rank"}).evaluate({q: cut_run})
                out[m][q] = rr[q]["recip_rank"]
            else:
                out[m][q] = res[q][names[family].format(k=k)]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_pytrec_eval_with_graded_qrels_empty_queries_and_ties(seed, ties):
    run, qrels = random_case(seed, ties=ties)
    ours = per_query_scores(run, qrels, METRICS)
    ref = pytrec_reference(run, qrels, METRICS)
    assert set(ours["ndcg@10"]) == set(ref["ndcg@10"])  # same query set: no-relevant queries excluded
    assert len(ours["ndcg@10"]) < len(qrels)  # ... and there were some to exclude
    for m in METRICS:
        for q in ref[m]:
            assert ours[m][q] == pytest.approx(ref[m][q], abs=1e-9), (m, q)


@pytest.mark.parametrize("seed", [3, 4])
def test_matches_ranx_on_tie_free_runs(seed):
    ranx = pytest.importorskip("ranx")
    run, qrels = random_case(seed, ties=False)
    kept = {q: g for q, g in qrels.items() if any(v >= 1 for v in g.values()) and run.get(q)}
    r_qrels = ranx.Qrels.from_dict({q: {d: int(g) for d, g in kept[q].items()} for q in kept})
    r_run = ranx.Run.from_dict({q: run[q] for q in kept})
    ref = ranx.evaluate(r_qrels, r_run, METRICS, return_mean=False)
    ours = per_query_scores({q: run[q] for q in kept}, kept, METRICS)
    for m in METRICS:
        for q in kept:
            # ranx returns per-query arrays in its own (sorted) query order
            assert ours[m][q] == pytest.approx(ref[m][list(r_qrels.keys()).index(q)], abs=1e-9), (m, q)
        assert evaluate_run({q: run[q] for q in kept}, kept, [m])[m] == pytest.approx(
            ranx.evaluate(r_qrels, r_run, m), abs=1e-9)


def test_ties_broken_by_doc_id_descending_like_trec_eval():
    assert rank_documents({"a": 1.0, "c": 1.0, "b": 2.0, "d": 0.5}) == ["b", "c", "a", "d"]
    # the relevant "a" loses the tie against "c": rank 2 at k=2, outside the top 1
    run, qrels = {"q": {"a": 1.0, "c": 1.0}}, {"q": {"a": 1}}
    out = evaluate_run(run, qrels, ["recall@1", "mrr@10"])
    assert out == {"recall@1": 0.0, "mrr@10": 0.5}


def test_hand_computed_graded_ndcg_and_missing_query():
    # ranking: d1 (grade 0... unjudged), d2 (grade 2), d3 (grade 1); ideal: 2, 1
    run = {"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}
    qrels = {"q1": {"d2": 2, "d3": 1}, "q2": {"x": 1}, "q3": {}}
    means, per_query = evaluate_run(run, qrels, ["ndcg@3", "map@3", "recall@1"], return_per_query=True)
    import math

    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert per_query["ndcg@3"]["q1"] == pytest.approx(dcg / idcg)
    assert per_query["map@3"]["q1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert per_query["ndcg@3"]["q2"] == 0.0  # relevant but not retrieved -> 0, kept in the mean
    assert "q3" not in per_query["ndcg@3"]  # no relevant document -> excluded
    assert means["ndcg@3"] == pytest.approx(dcg / idcg / 2)


def test_recall_curve_matches_recall_at_k():
    run, qrels = random_case(5, ties=True)
    curve = recall_curve(run, qrels, 40)
    for k in (1, 5, 10, 40):
        assert curve[k - 1] == pytest.approx(evaluate_run(run, qrels, [f"recall@{k}"])[f"recall@{k}"])


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


def test_randomization_agrees_with_t_test_on_a_moderate_effect():
    # Both tests estimate the same null; on 200 roughly normal differences their p-values are close.
    rng = random.Random(1)
    base = {f"q{i}": rng.random() for i in range(200)}
    treat = {q: v + 0.03 + rng.gauss(0, 0.2) for q, v in base.items()}
    p_rand = paired_test(base, treat, method="randomization", num_permutations=20_000)
    p_t = paired_test(base, treat, method="t-test")
    assert abs(p_rand - p_t) < 0.02 + 0.2 * p_t


def test_randomization_p_value_matches_exact_enumeration():
    # With 10 queries all 2^10 sign vectors can be enumerated: the exact p-value of the sign-flip test.
    import itertools

    import numpy as np

    rng = random.Random(2)
    base = {f"q{i}": rng.random() for i in range(10)}
    treat = {q: v + rng.gauss(0.15, 0.2) for q, v in base.items()}
    d = np.array([treat[q] - base[q] for q in sorted(base)])
    flips = np.array(list(itertools.product([-1, 1], repeat=10)))
    exact = float(np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-12))
    p = paired_test(base, treat, method="randomization", num_permutations=20_000, seed=3)
    assert p == pytest.approx(exact, abs=4 * (exact * (1 - exact) / 20_000) ** 0.5 + 1e-4)
