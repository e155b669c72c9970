"""rag-capg eval end to end on the tiny BEIR fixture with a tiny random bi-encoder."""

from __future__ import annotations

import json
import shutil

import pytest

from rag_capg import cli
from rag_capg.evaluation.evaluate import main, read_trec_run
from rag_capg.evaluation.metrics import evaluate_run


@pytest.fixture(scope="module")
def two_model_eval(tmp_path_factory, tiny_beir_dir, tiny_bi_encoder_path):
    """One eval call: the tiny model, a fake training run folder around a copy of it, and a TREC run file."""
    root = tmp_path_factory.mktemp("eval")
    run_dir = root / "run"
    shutil.copytree(tiny_bi_encoder_path, run_dir / "final")
    rows = [{"step": s, "loss": 1.0 / s, "reward_mean": 0.1 * s} for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "eval.jsonl").write_text(json.dumps({"step": 0, "split": "test", "ndcg@10": 0.3}) + "\n")
    # A third "model": a hand-made TREC run that ranks a relevant passage first for every test query.
    from rag_capg.retrieval.data import load_corpus, load_queries

    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "test", corpus)
    oracle = root / "oracle.trec"
    oracle.write_text("".join(f"{q} Q0 {d} {r} {10 - r} oracle\n" for q in queries.ids
                              for r, d in enumerate(sorted(queries.qrels[q], key=queries.qrels[q].get,
                                                           reverse=True), 1)))
    out = root / "out"
    argv = [f"models=[{tiny_bi_encoder_path},{run_dir},{oracle}]", f"dataset={tiny_beir_dir}", "eval_split=test",
            "candidates=20", f"cache_dir={root / 'cache'}", f"output_dir={out}", "lsr=label_oracle", "num_picks=5",
            "num_permutations=500"]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text()), queries, argv, root


def test_outputs_written_and_trec_file_reproduces_metrics(two_model_eval):
    out, report, queries, _, _ = two_model_eval
    names = [m["name"] for m in report["models"]]
    assert names == ["st", "run", "oracle"]
    for f in ("results.md", "recall_at_k.png", "run.training.png", "runs/st.trec", "runs/st.rerank.trec"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "results.md").read_text()
    assert "nDCG" in md or "ndcg@10" in md and "| st |" in md
    first = report["models"][0]["first_stage"]["mean"]
    assert set(first) == {"recall@10", "recall@20", "recall@100", "ndcg@10", "mrr@10", "map@100"}
    # The TREC file parses back and gives the same numbers through our metrics and through pytrec_eval.
    run = read_trec_run(out / "runs" / "st.trec")
    assert evaluate_run(run, queries.qrels, ["ndcg@10"])["ndcg@10"] == pytest.approx(first["ndcg@10"])
    pytrec_eval = pytest.importorskip("pytrec_eval")
    with open(out / "runs" / "st.trec") as f:
        parsed = pytrec_eval.parse_run(f)
    res = pytrec_eval.RelevanceEvaluator(queries.qrels, {"ndcg_cut.10", "recall.20"}).evaluate(parsed)
    assert sum(r["ndcg_cut_10"] for r in res.values()) / len(res) == pytest.approx(first["ndcg@10"], abs=1e-6)
    assert sum(r["recall_20"] for r in res.values()) / len(res) == pytest.approx(first["recall@20"], abs=1e-6)


def test_run_folder_and_significance(two_model_eval):
    _, report, queries, _, _ = two_model_eval
    st, run, oracle = report["models"]
    assert run["kind"] == "run_folder" and run["training_curves"] == "run.training.png"
    # Same weights -> identical per-query values -> p = 1 on every metric.
    assert run["first_stage"]["mean"] == st["first_stage"]["mean"]
    assert set(run["first_stage"]["p_value"].values()) == {1.0}
    # The oracle run is perfect (nDCG@10 = 1) and the random model is not. With 8 test queries the smallest
    # possible two-sided randomisation p is 2 / 2^8; queries the random model also gets right add ties.
    assert oracle["first_stage"]["mean"]["ndcg@10"] == pytest.approx(1.0)
    assert st["first_stage"]["mean"]["ndcg@10"] < 0.9
    assert oracle["first_stage"]["p_value"]["ndcg@10"] < 0.1


def test_two_stage_with_label_oracle_is_an_upper_bound(two_model_eval):
    _, report, _, _, _ = two_model_eval
    st = report["models"][0]
    # A label-oracle LSR sorts the top-K by grade: nDCG@10 of the final list is the best any reranking of the
    # top-K can do, and Recall@L cannot exceed the first stage's Recall@K.
    assert st["two_stage"]["mean"]["ndcg@10"] >= st["first_stage"]["mean"]["ndcg@10"]
    assert st["two_stage"]["mean"]["recall@5"] <= st["first_stage"]["mean"]["recall@20"] + 1e-9
    assert report["lsr"]["identity"]


def test_corpus_embeddings_cached_and_reused(two_model_eval, tiny_beir_dir, tiny_bi_encoder_path, monkeypatch):
    out, _, _, _, root = two_model_eval
    assert list((root / "cache" / "embeddings").glob("corpus-*.pt"))  # both models share one cache file
    import rag_capg.retrieval.retriever as R

    calls = []
    real = R._encode
    monkeypatch.setattr(R, "_encode", lambda model, texts, route, *a, **k: calls.append(route) or real(
        model, texts, route, *a, **k))
    assert main([f"models=[{tiny_bi_encoder_path}]", f"dataset={tiny_beir_dir}", "candidates=20",
                 f"cache_dir={root / 'cache'}", f"output_dir={root / 'out2'}"]) == 0
    assert calls == ["query"]  # the corpus came from the cache


@pytest.mark.parametrize("args, needle", [
    (["eval_split=nope"], "nope"),
    (["models=[{tmp}/not_a_model]"], "not_a_model"),
    (["models=[{tmp}/empty]"], "empty"),
    (["models=[{tmp}/bad.trec]"], "bad.trec:1"),
    (["models=[{tmp}/unknown.trec]"], "not in the corpus"),
    (["candidates=0"], "`candidates`"),
    (["similarity=euclid"], "similarity"),
])
def test_bad_input_exits_2_naming_the_problem(args, needle, tiny_beir_dir, tiny_bi_encoder_path, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.trec").write_text("q12 Q0 d0_0 1\n")
    (tmp_path / "unknown.trec").write_text("q12 Q0 nope 1 1.0 x\n")
    base = {"models": f"models=[{tiny_bi_encoder_path}]", "dataset": f"dataset={tiny_beir_dir}",
            "candidates": "candidates=20",
            "output_dir": f"output_dir={tmp_path / 'o'}", "cache_dir": f"cache_dir={tmp_path / 'c'}"}
    for a in args:
        base[a.split("=")[0]] = a.replace("{tmp}", str(tmp_path))
    code = cli.main(["eval", *base.values()])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not (tmp_path / "o" / "results.json").exists()
