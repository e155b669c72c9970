"""rag_capg.train_utils: building the LSR from a config (the bi-encoder teacher's corpus-cache seeding, where
scores are cached)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rag_capg.data import load_corpus, load_queries
from rag_capg.judges import BiEncoderTeacher
from rag_capg.retriever import encode_corpus
from rag_capg.train_utils import build_judge, seed_teacher_from_cache


def test_teacher_starts_from_the_corpus_cache_and_scores_the_same(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "train", corpus)
    cache = tmp_path / "cache"
    fresh = BiEncoderTeacher(tiny_bi_encoder_path)
    assert not seed_teacher_from_cache(fresh, corpus, cache / "embeddings")  # nothing cached yet
    encode_corpus(fresh.model, corpus, cache_dir=cache / "embeddings", normalize=True, show_progress=False)

    config = SimpleNamespace(lsr="bi_encoder", lsr_model=str(tiny_bi_encoder_path), lsr_batch_size=8,
                             cache_dir=str(cache), lsr_on_error="error")
    seeded = build_judge(config, queries, SimpleNamespace(device=torch.device("cpu")), corpus).judge

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
    config = SimpleNamespace(lsr="label_oracle", cache_dir=str(tmp_path / "cache"), lsr_on_error="error")
    judge = build_judge(config, queries, SimpleNamespace(device=torch.device("cpu")), corpus)
    qid = queries.ids[0]
    relevant = next(iter(queries.qrels[qid]))
    other = next(p for p in corpus.ids if p not in queries.qrels[qid])
    grade = float(queries.qrels[qid][relevant])
    for _ in range(2):  # the second call is answered from memory
        scores = judge.score([qid, qid], ["", ""], [[relevant, other], [other, relevant]], [["", ""], ["", ""]])
        assert scores.tolist() == [[grade, 0.0], [0.0, grade]] and grade > 0
    assert judge.stats()["hits"] == 4 and judge.stats()["misses"] == 4
    assert not (tmp_path / "cache").exists()
