"""rag_capg.judges.build: the judge the options name (the bi-encoder teacher's corpus-cache seeding), where its
scores are cached, and every form of judge the trainer accepts."""

from __future__ import annotations

import torch

from rag_capg.judges import BiEncoderTeacher
from rag_capg.judges.build import JudgeArguments, as_cached_judge, build_judge, seed_teacher_from_cache
from rag_capg.retrieval.data import load_corpus, load_queries
from rag_capg.retrieval.retriever import encode_corpus


def test_teacher_starts_from_the_corpus_cache_and_scores_the_same(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "train", corpus)
    cache = tmp_path / "cache"
    fresh = BiEncoderTeacher(tiny_bi_encoder_path)
    assert not seed_teacher_from_cache(fresh, corpus, cache / "embeddings")  # nothing cached yet
    encode_corpus(fresh.model, corpus, cache_dir=cache / "embeddings", normalize=True, show_progress=False)

    args = JudgeArguments(lsr="bi_encoder", lsr_model=str(tiny_bi_encoder_path), lsr_batch_size=8)
    seeded = build_judge(args, queries, corpus, cache_dir=cache)

    def no_passage_encoding(*args, **kwargs):
        raise AssertionError("a seeded teacher must not encode passages")

    seeded.model.encode_document = no_passage_encoding
    pids = [corpus.ids[:5], corpus.ids[5:10]]
    texts = [[corpus.texts[corpus.ids.index(p)] for p in row] for row in pids]
    args = (queries.ids[:2], queries.texts[:2], pids, texts)
    torch.testing.assert_close(seeded.score(*args), fresh.score(*args), atol=1e-5, rtol=0)


def test_label_oracle_scores_qrels_and_writes_no_score_file(tmp_path, tiny_beir_dir):
    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "train", corpus)
    judge = as_cached_judge(build_judge(JudgeArguments(lsr="label_oracle"), queries, corpus),
                            cache_dir=tmp_path / "cache")
    qid = queries.ids[0]
    relevant = next(iter(queries.qrels[qid]))
    other = next(p for p in corpus.ids if p not in queries.qrels[qid])
    grade = float(queries.qrels[qid][relevant])
    for _ in range(2):  # the second call is answered from memory
        scores = judge.score([qid, qid], ["", ""], [[relevant, other], [other, relevant]], [["", ""], ["", ""]])
        assert scores.tolist() == [[grade, 0.0], [0.0, grade]] and grade > 0
    assert judge.stats()["hits"] == 4 and judge.stats()["misses"] == 4
    assert not (tmp_path / "cache").exists()


def word_overlap(query_ids, queries, passage_ids, passages):
    return [[float(len(set(q.split()) & set(p.split()))) for p in row] for q, row in zip(queries, passages)]


def test_every_form_of_judge_becomes_a_cached_judge(tmp_path, tiny_beir_dir, tiny_cross_encoder_path):
    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "train", corpus)
    args = (queries.ids[:1], queries.texts[:1], [corpus.ids[:3]], [corpus.texts[:3]])
    from_fn = as_cached_judge(word_overlap, cache_dir=tmp_path)
    assert from_fn.identity == f"callable:{__name__}.word_overlap"
    assert from_fn.score(*args).tolist() == [word_overlap(*args)[0]]
    assert (tmp_path / "lsr").is_dir()  # a model-free callable is still cached on disk: it may be slow
    oracle = as_cached_judge("label_oracle", cache_dir=tmp_path, queries=queries)
    assert oracle.identity.startswith("LabelOracle:")
    cross = as_cached_judge(str(tiny_cross_encoder_path), cache_dir=tmp_path)
    assert cross.identity.startswith("CrossEncoderJudge:") and cross.score(*args).shape == (1, 3)
    assert as_cached_judge(cross, cache_dir=tmp_path) is cross  # already cached: kept as it is
