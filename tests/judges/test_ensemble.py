"""rag_capg.judges.ensemble: the fused score against a hand computation (weights, transforms, corpus and sample
references), each member behind its own cache (a second run asks no member; adding a member asks only it),
pointwise scores, and the recipe form (lsr=ensemble, lsr_members)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError
from rag_capg.judges import BiEncoderTeacher, CallableJudge
from rag_capg.judges.bm25 import BM25Judge
from rag_capg.judges.build import JudgeArguments, as_cached_judge, build_judge
from rag_capg.judges.ensemble import EnsembleJudge, reference_sample
from rag_capg.retrieval.data import Corpus

TEXTS = ["Cats purr when they are content and warm.", "Rockets burn liquid fuel to reach orbit.",
         "The cat sat on the mat; the cat slept.", "Bees make honey from nectar.",
         "A purring cat is usually a content cat.", "Liquid water covers most of the planet.",
         "Honey bees dance to share where flowers are.", "Orbit mechanics: rockets, fuel and gravity.",
         "Volcanoes erupt lava and ash.", "Owls hunt mice at night."]
CORPUS = Corpus(ids=[f"d{i}" for i in range(len(TEXTS))], texts=TEXTS)
QIDS, QUERIES = ["q0", "q1", "q2"], ["why do cats purr", "rocket fuel", "honey bees"]


class Counting:
    """A callable judge that records every pair it is asked about."""

    def __init__(self, fn, identity):
        self.fn, self.identity, self.asked = fn, identity, []

    def score(self, query_ids, queries, passage_ids, passages):
        self.asked += [(q, p) for q, row in zip(query_ids, passage_ids) for p in row]
        return torch.tensor([[self.fn(q, p) for p in row] for q, row in zip(queries, passages)], dtype=torch.float32)


def length(q, p):
    return float(len(p))


def overlap_probability(q, p):  # a "probability": share of query words found in the passage, kept inside (0, 1)
    words = set(q.lower().split())
    return (0.5 + len(words & set(p.lower().replace(".", " ").split()))) / (len(words) + 1.0)


def test_weights_transforms_and_sample_references_against_a_hand_computation():
    # a reference at least as large as the corpus is the whole corpus: mean and sample std over all N by hand
    a, b = Counting(length, "len"), Counting(overlap_probability, "overlap")
    judge = EnsembleJudge([a, b], [2.0, 0.5], corpus=CORPUS, transforms=["none", "logit"], reference_size=50)
    assert judge.references == ["sample", "sample"]
    pids = [["d0", "d3", "d4"], ["d1", "d7", "d9"]]
    got = judge.score(QIDS[:2], QUERIES[:2], pids, [[TEXTS[int(p[1:])] for p in row] for row in pids])
    expected = np.zeros((2, 3))
    for i, q in enumerate(QUERIES[:2]):
        raw_a = np.array([length(q, t) for t in TEXTS])
        p = np.array([overlap_probability(q, t) for t in TEXTS])
        raw_b = np.log(p / (1 - p))
        for j, pid in enumerate(pids[i]):
            k = int(pid[1:])
            expected[i, j] = (2.0 * (raw_a[k] - raw_a.mean()) / raw_a.std(ddof=1)
                              + 0.5 * (raw_b[k] - raw_b.mean()) / raw_b.std(ddof=1))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_reference_sample_is_seeded_by_the_query_alone():
    first = reference_sample("q7", 1000, 32)
    assert len(set(first.tolist())) == 32 and first.min() >= 0 and first.max() < 1000
    assert np.array_equal(first, reference_sample("q7", 1000, 32))
    assert not np.array_equal(first, reference_sample("q8", 1000, 32))
    assert not np.array_equal(first, reference_sample("q7", 1000, 32, seed=1))
    assert sorted(reference_sample("q7", 5, 32).tolist()) == [0, 1, 2, 3, 4]  # R >= N: the whole corpus


def test_bm25_plus_bi_encoder_with_corpus_references_equals_brute_force(tmp_path, tiny_bi_encoder_path):
    bm25, teacher = BM25Judge(CORPUS), BiEncoderTeacher(tiny_bi_encoder_path)
    judge = EnsembleJudge([bm25, teacher], [1.0, 3.0], corpus=CORPUS, cache_dir=tmp_path)
    assert judge.references == ["corpus", "corpus"] and judge.transforms == ["none", "none"]
    got = judge.score(QIDS, QUERIES, [CORPUS.ids] * 3, [TEXTS] * 3).double()
    # brute force: every passage scored, each member standardised by numpy over the corpus (population std)
    d = teacher.model.encode_document(TEXTS, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64)
    q = teacher.model.encode_query(QUERIES, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64)
    cos = q @ d.T
    z_cos = (cos - cos.mean(1, keepdims=True)) / cos.std(1, keepdims=True)
    raw = np.stack([bm25.bm25_scores(t).astype(np.float64) for t in QUERIES])
    z_bm25 = (raw - raw.mean(1, keepdims=True)) / raw.std(1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), z_bm25 + 3.0 * z_cos, rtol=1e-4, atol=1e-4)
    # the teacher took the corpus vectors from the embedding cache that the trainer and eval share
    assert any((tmp_path / "embeddings").iterdir())


def test_each_member_has_its_own_cache_a_second_run_asks_no_member_and_a_new_member_only_itself(tmp_path):
    cache = tmp_path / "cache"
    pids = [["d0", "d2", "d4"], ["d1", "d7", "d5"]]
    args = (QIDS[:2], QUERIES[:2], pids, [[TEXTS[int(p[1:])] for p in row] for row in pids])

    def run(members):
        ens = EnsembleJudge(members, [1.0] * len(members), corpus=CORPUS, reference_size=4, cache_dir=cache)
        return as_cached_judge(ens, cache_dir=cache).score(*args), ens

    a, b = Counting(length, "len"), Counting(overlap_probability, "overlap")
    first, ens = run([a, b])
    assert len({m.identity for m in ens.members}) == 2
    assert {p.name for p in (cache / "lsr").glob("*.sqlite")} >= {f"{n}.sqlite" for n in _files(ens)}
    # each member is asked once per pair: the 6 candidates and the two queries' references of 4
    needed = {(q, p) for q, row in zip(QIDS, pids) for p in row} | {
        (q, CORPUS.ids[j]) for q in QIDS[:2] for j in reference_sample(q, len(CORPUS), 4)}
    assert sorted(a.asked) == sorted(needed) and sorted(b.asked) == sorted(needed)

    a2, b2 = Counting(length, "len"), Counting(overlap_probability, "overlap")
    second, _ = run([a2, b2])  # a second run: the ensemble's own cache answers
    assert a2.asked == [] and b2.asked == [] and torch.equal(first, second)

    a3, b3, c = Counting(length, "len"), Counting(overlap_probability, "overlap"), Counting(length, "len-again")
    third, ens3 = run([a3, b3, c])  # a new member: only it is asked (its pairs and its references)
    assert a3.asked == [] and b3.asked == [] and sorted(c.asked) == sorted(needed)
    assert ens3.identity != ens.identity
    torch.testing.assert_close(third, first + ens3.member_z(2, *args).float(), rtol=0, atol=1e-5)


def _files(ens):
    import hashlib

    return [hashlib.sha256(m.identity.encode()).hexdigest()[:16] for m in ens.members]


def test_pointwise_same_score_in_any_list_and_any_batch(tiny_bi_encoder_path):
    members = [BM25Judge(CORPUS), BiEncoderTeacher(tiny_bi_encoder_path), CallableJudge(
        lambda qi, q, pi, p: [[overlap_probability(x, y) for y in row] for x, row in zip(q, p)], "prob")]
    judge = EnsembleJudge(members, [1.0, 1.0, 0.5], corpus=CORPUS, reference_size=5)
    assert judge.references == ["corpus", "corpus", "sample"]
    full = judge.score(QIDS, QUERIES, [CORPUS.ids] * 3, [TEXTS] * 3)
    fresh = EnsembleJudge(members, [1.0, 1.0, 0.5], corpus=CORPUS, reference_size=5)  # no memory of the above
    for qi, pid_rows in ((2, [["d6"], ["d3", "d6"]]), (0, [["d9", "d4", "d0"]])):
        for row in pid_rows:
            got = fresh.score([QIDS[qi]], [QUERIES[qi]], [row], [[TEXTS[int(p[1:])] for p in row]])[0]
            torch.testing.assert_close(got, full[qi, [int(p[1:]) for p in row]], rtol=0, atol=1e-5)


def test_recipe_form_builds_members_with_inherited_options_and_errors_name_the_member(tmp_path,
                                                                                     tiny_bi_encoder_path):
    argv = ["lsr=ensemble", "lsr_bm25_stemmer=none", "lsr_reference_size=6",
            f"lsr_members=[{{lsr: bm25, weight: 2}}, {{lsr: bi_encoder, lsr_model: '{tiny_bi_encoder_path}'}}]"]
    args = parse_config(JudgeArguments, argv, prog="test")
    judge = build_judge(args, corpus=CORPUS, cache_dir=tmp_path)
    assert isinstance(judge, EnsembleJudge) and judge.weights == [2.0, 1.0] and judge.reference_size == 6
    assert judge.members[0].identity == BM25Judge(CORPUS, stemmer="none").identity  # inherited from the top level
    assert judge.members[1].identity == BiEncoderTeacher(tiny_bi_encoder_path).identity
    assert torch.isfinite(judge.score(QIDS[:1], QUERIES[:1], [["d0", "d1"]], [TEXTS[:2]])).all()
    # the same list from a recipe file and from --lsr-members, one mapping per value
    recipe = tmp_path / "fused.yaml"
    recipe.write_text("lsr: ensemble\nlsr_members:\n  - {lsr: bm25, weight: 2}\n  - lsr: bm25\n    lsr_bm25_k1: 1.2\n")
    flags = ["lsr=ensemble", "--lsr-members", "{lsr: bm25, weight: 2}", "{lsr: bm25, lsr_bm25_k1: 1.2}"]
    assert parse_config(JudgeArguments, [str(recipe)], prog="t").lsr_members == \
        parse_config(JudgeArguments, flags, prog="t").lsr_members == [{"lsr": "bm25", "weight": 2},
                                                                      {"lsr": "bm25", "lsr_bm25_k1": 1.2}]
    with pytest.raises(InputError, match=r"lsr_members\[1\]`: expected a mapping"):
        parse_config(JudgeArguments, ["lsr=ensemble", "--lsr-members", "{lsr: bm25}", "bm25"], prog="t")
    with pytest.raises(InputError, match=r"lsr_members\[1\]\.lsr_model"):
        parse_config(JudgeArguments, ["lsr=ensemble", "lsr_members=[{lsr: bm25}, {lsr: cross_encoder}]"], prog="t")
    with pytest.raises(InputError, match=r"lsr_members\[0\]\.weight"):
        JudgeArguments(lsr="ensemble", lsr_members=[{"lsr": "bm25", "weight": 0}])
    with pytest.raises(InputError, match=r"lsr_members\[0\]\.lsr_timeout"):
        JudgeArguments(lsr="ensemble", lsr_members=[{"lsr": "bm25", "lsr_timeout": 3}])
    with pytest.raises(InputError, match="lsr_members"):
        JudgeArguments(lsr="ensemble")
    with pytest.raises(InputError, match=r"lsr_members\[0\]\.reference"):  # a callable cannot score the corpus
        build_judge(JudgeArguments(lsr="ensemble", lsr_members=[
            {"lsr": "callable", "lsr_callable": f"{__name__}:plain_length", "reference": "corpus"}]), corpus=CORPUS)


def plain_length(query_ids, queries, passage_ids, passages):
    return [[float(len(p)) for p in row] for row in passages]
