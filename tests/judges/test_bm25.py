"""rag_capg.judges.bm25: BM25Judge scores are bm25s' own (and the Lucene formula by hand), standardised over
the whole corpus per query, pointwise, and the index is built once and then loaded from the cache folder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rag_capg.errors import InputError
from rag_capg.judges import ScoreCache
from rag_capg.judges.bm25 import BM25Judge
from rag_capg.judges.build import JudgeArguments, as_cached_judge, build_judge
from rag_capg.retrieval.data import Corpus

TEXTS = ["Cats purr when they are content and warm.", "Rockets burn liquid fuel to reach orbit.",
         "The cat sat on the mat; the cat slept.", "Bees make honey from nectar.",
         "A purring cat is usually a content cat.", "Liquid water covers most of the planet.",
         "Honey bees dance to share where flowers are.", "Orbit mechanics: rockets, fuel and gravity."]
CORPUS = Corpus(ids=[f"d{i}" for i in range(len(TEXTS))], texts=TEXTS)
QUERIES = ["why do cats purr", "rocket fuel", "honey"]


def test_raw_scores_equal_bm25s_own_and_z_is_the_corpus_standardisation(tmp_path):
    import bm25s
    import Stemmer

    judge = BM25Judge(CORPUS, stemmer="english", stopwords="english", k1=1.2, b=0.6, cache_dir=tmp_path)
    stem = Stemmer.Stemmer("english")
    own = bm25s.BM25(k1=1.2, b=0.6)
    own.index(bm25s.tokenize(TEXTS, stopwords="en", stemmer=stem, show_progress=False), show_progress=False)
    for q in QUERIES:
        expected = own.get_scores(bm25s.tokenize([q], stopwords="en", stemmer=stem, return_ids=False,
                                                 show_progress=False)[0])
        assert expected.max() > 0
        np.testing.assert_array_equal(judge.bm25_scores(q), expected)
        z = (expected.astype(np.float64) - expected.mean(dtype=np.float64)) / expected.std(dtype=np.float64)
        got = judge.score(["q"], [q], [CORPUS.ids], [TEXTS])
        torch.testing.assert_close(got, torch.tensor(z, dtype=torch.float32)[None], rtol=0, atol=1e-6)
        assert abs(float(got.double().mean())) < 1e-6 and abs(float(got.double().std(correction=0)) - 1) < 1e-6


def test_lucene_bm25_by_hand_without_stemming_or_stopwords():
    k1, b = 1.5, 0.75
    judge = BM25Judge(CORPUS, stemmer="none", stopwords="none", k1=k1, b=b)
    docs = [[w for w in t.lower().replace(";", " ").replace(":", " ").replace(",", " ").replace(".", " ").split()
             if len(w) > 1] for t in TEXTS]  # bm25s' token pattern: runs of >= 2 word characters
    avgdl, n = sum(map(len, docs)) / len(docs), len(docs)
    query = ["cat", "content", "orbit"]
    hand = []
    for d in docs:
        s = 0.0
        for t in query:
            df, tf = sum(t in dd for dd in docs), d.count(t)
            s += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        hand.append(s)
    np.testing.assert_allclose(judge.bm25_scores(" ".join(query)), hand, rtol=1e-6)


def test_pointwise_same_score_in_any_list_and_any_batch():
    judge = BM25Judge(CORPUS)
    full = judge.score(["q0"], [QUERIES[0]], [CORPUS.ids], [TEXTS])[0]
    for pids in (["d4", "d0"], ["d0"], ["d7", "d3", "d0", "d2"]):
        got = judge.score(["q0"], [QUERIES[0]], [pids], [[TEXTS[int(p[1:])] for p in pids]])[0]
        assert got.tolist() == [full[int(p[1:])].item() for p in pids]
    # in a batch with other queries, and through the cache (rows of one pair), the same numbers
    batch = judge.score(["q1", "q0"], [QUERIES[1], QUERIES[0]], [["d1", "d0"], ["d0", "d4"]], [["", ""], ["", ""]])
    assert batch[1].tolist() == [full[0].item(), full[4].item()]
    cached = ScoreCache(judge, None).score(["q0", "q1"], [QUERIES[0], QUERIES[1]], [["d4", "d0"], ["d0", "d1"]],
                                           [["", ""], ["", ""]])
    assert cached[0].tolist() == [full[4].item(), full[0].item()] and cached[1].tolist() == batch[0].flip(0).tolist()


def test_a_query_with_no_corpus_term_scores_zero_and_an_unknown_passage_is_an_error():
    judge = BM25Judge(CORPUS)
    assert judge.score(["q"], ["zyxwv the of"], [["d0", "d1"]], [["", ""]]).tolist() == [[0.0, 0.0]]
    mean, std = judge.corpus_moments(["a", "b"], ["zyxwv", "honey"])
    assert mean.tolist() == [0.0, 0.0] and std.tolist() == [0.0, 1.0]
    from rag_capg.judges import JudgeError

    with pytest.raises(JudgeError, match="not in the BM25 judge's corpus"):
        ScoreCache(judge, None).score(["q"], ["honey"], [["nope"]], [[""]])


def test_index_built_once_then_loaded_and_keyed_by_options(tmp_path, monkeypatch):
    import bm25s

    first = BM25Judge(CORPUS, cache_dir=tmp_path)
    folders = sorted(p.name for p in (tmp_path / "bm25").iterdir())
    assert len(folders) == 1 and folders[0].startswith(CORPUS.fingerprint)

    def no_indexing(*args, **kwargs):
        raise AssertionError("the cached index must be loaded, not rebuilt")

    monkeypatch.setattr(bm25s.BM25, "index", no_indexing)
    again = BM25Judge(CORPUS, cache_dir=tmp_path)
    assert again.identity == first.identity
    np.testing.assert_array_equal(again.bm25_scores("rocket fuel"), first.bm25_scores("rocket fuel"))
    monkeypatch.undo()
    other = BM25Judge(CORPUS, stemmer="none", cache_dir=tmp_path)  # other options: another index and identity
    assert other.identity != first.identity and len(list((tmp_path / "bm25").iterdir())) == 2
    assert not [p for p in (tmp_path / "bm25").iterdir() if p.name.startswith(".")]  # no temporary left over


def test_options_build_the_judge_and_bad_ones_name_their_field(tmp_path):
    args = JudgeArguments(lsr="bm25", lsr_bm25_stemmer="none", lsr_bm25_k1=1.2)
    judge = as_cached_judge(build_judge(args, corpus=CORPUS, cache_dir=tmp_path), cache_dir=tmp_path)
    assert judge.identity == BM25Judge(CORPUS, stemmer="none", k1=1.2).identity
    assert (tmp_path / "bm25").is_dir() and len(list((tmp_path / "lsr").iterdir())) >= 1
    for bad, name in ((dict(lsr_bm25_stemmer="klingon"), "lsr_bm25_stemmer"),
                      (dict(lsr_bm25_stopwords="klingon"), "lsr_bm25_stopwords"),
                      (dict(lsr_bm25_b=1.5), "lsr_bm25_b")):
        with pytest.raises(InputError, match=name):
            JudgeArguments(lsr="bm25", **bad)
    with pytest.raises(InputError, match="needs the corpus"):
        build_judge(JudgeArguments(lsr="bm25"))


def test_eval_reranks_each_models_top_k_by_bm25(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # the two-stage list of `rag-capg eval ... lsr=bm25` is the ESR's top-K sorted by the BM25 z-score
    from rag_capg.config_parsing import config_from_dict
    from rag_capg.evaluation.evaluate import EvalConfig, evaluate
    from rag_capg.evaluation.trec import read_trec_run
    from rag_capg.retrieval.data import load_corpus, load_queries

    out = tmp_path / "eval"
    config = config_from_dict(EvalConfig, dict(models=[str(tiny_bi_encoder_path)], names=["tiny"],
                                               dataset=str(tiny_beir_dir), eval_split="test", candidates=6,
                                               num_picks=3, lsr="bm25", cache_dir=str(tmp_path / "cache"),
                                               output_dir=str(out)))
    report = evaluate(config, command="test")
    assert report["lsr"]["identity"].startswith("BM25Judge:")
    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "test", corpus)
    first, final = read_trec_run(out / "runs" / "tiny.trec"), read_trec_run(out / "runs" / "tiny.rerank.trec")
    bm25 = BM25Judge(corpus)
    for qid, text in zip(queries.ids, queries.texts):
        top = sorted(first[qid], key=lambda d: -first[qid][d])[:6]
        z = bm25.corpus_z(text)
        expected = sorted(top, key=lambda d: -z[corpus.index_of[d]])  # stable: ESR order among ties
        assert sorted(final[qid], key=lambda d: -final[qid][d]) == expected
