"""LSR: judges against independent computations, the score cache, failure policies, pick and to_reward."""

from __future__ import annotations

import math
import time

import pytest
import torch

from rag_capg import judges
from rag_capg.judges import JudgeError

QIDS = ["q1", "q2"]
QUERIES = ["why do cats purr", "how do rockets fly"]
PIDS = [["a", "b", "c"], ["d", "a", "e"]]
PASSAGES = [["cats purr when content", "bread rises with yeast", "a much longer passage about owls at night"],
            ["rockets burn fuel", "cats purr when content", "tea"]]


def test_cross_encoder_judge_equals_predict_with_sigmoid(tiny_cross_encoder_path):
    from sentence_transformers import CrossEncoder

    judge = judges.CrossEncoderJudge(tiny_cross_encoder_path, batch_size=2)
    got = judge.score(QIDS, QUERIES, PIDS, PASSAGES)
    ce = CrossEncoder(str(tiny_cross_encoder_path))
    pairs = [(q, p) for q, row in zip(QUERIES, PASSAGES) for p in row]
    logits = torch.as_tensor(ce.predict(pairs, activation_fn=torch.nn.Identity())).reshape(2, 3)
    assert got.shape == (2, 3) and torch.allclose(got, torch.sigmoid(logits), atol=1e-6)
    assert torch.allclose(got, torch.as_tensor(ce.predict(pairs)).reshape(2, 3), atol=1e-6)  # ST's default
    assert judge.identity == judges.CrossEncoderJudge(tiny_cross_encoder_path).identity


def test_llm_judge_manual_and_batch_invariant(tiny_causal_lm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = judges.LLMJudge(tiny_causal_lm_path, batch_size=4)
    got = judge.score(QIDS, QUERIES, PIDS, PASSAGES)
    assert got.shape == (2, 3) and ((got > 0) & (got < 1)).all()
    # manual: one unpadded pair (no BOS in this tokenizer), full softmax over the vocabulary, sum the yes / no
    # variant tokens
    tok = AutoTokenizer.from_pretrained(str(tiny_causal_lm_path))
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_causal_lm_path)).eval()
    yes = {tok.convert_tokens_to_ids(t) for t in ["yes"]}
    no = {tok.convert_tokens_to_ids(t) for t in ["no"]}
    assert set(judge.yes_ids) == yes and set(judge.no_ids) == no  # WordPiece: "yes" and "no" (lower-case)
    text = judge.prompt_template.format(query=QUERIES[1], passage=PASSAGES[1][2])
    with torch.no_grad():
        probs = lm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1].softmax(-1)
    p_yes, p_no = probs[list(yes)].sum(), probs[list(no)].sum()
    assert math.isclose(got[1, 2].item(), (p_yes / (p_yes + p_no)).item(), abs_tol=1e-5)
    # padding does not move scores: one pair at a time vs a batch of pairs of very different lengths
    single = judges.LLMJudge(tiny_causal_lm_path, batch_size=1).score(QIDS, QUERIES, PIDS, PASSAGES)
    assert torch.allclose(single, got, atol=1e-5)
    # over max_length the passage is cut, never the question the answer token follows
    short = judges.LLMJudge(tiny_causal_lm_path, max_length=40)
    ids = short.prompt_ids(QUERIES[0], "word " * 200)
    assert len(ids) <= 40 and tok.decode(ids).endswith("answer yes or no. answer :")
    assert short.identity != judge.identity


def test_llm_judge_chat_template_and_dtype(tiny_causal_lm_path, tmp_path):
    """A chat template wraps the prompt as one user turn (the text the model reads changes, so do the scores);
    bfloat16 weights give scores close to float32 ones under their own cache identity."""
    import shutil

    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat_lm"
    shutil.copytree(tiny_causal_lm_path, chat_dir)
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok.chat_template = "{% for m in messages %}<user> {{ m['content'] }} <assistant>{% endfor %}"
    tok.save_pretrained(chat_dir)
    plain = judges.LLMJudge(chat_dir)
    chat = judges.LLMJudge(chat_dir, use_chat_template=True)
    assert chat.prompt("q", "p") == "<user> " + plain.prompt("q", "p") + " <assistant>"
    assert chat.identity != plain.identity
    assert not torch.allclose(chat.score(QIDS, QUERIES, PIDS, PASSAGES), plain.score(QIDS, QUERIES, PIDS, PASSAGES))
    half = judges.LLMJudge(tiny_causal_lm_path, dtype=torch.bfloat16)
    full = judges.LLMJudge(tiny_causal_lm_path, dtype=torch.float32)
    assert half.model.dtype == torch.bfloat16 and half.identity != full.identity
    assert torch.allclose(half.score(QIDS, QUERIES, PIDS, PASSAGES), full.score(QIDS, QUERIES, PIDS, PASSAGES),
                          atol=0.05)


def test_label_oracle_grades():
    oracle = judges.LabelOracle({"q1": {"a": 2, "c": 1}, "q2": {}})
    assert torch.equal(oracle.score(QIDS, QUERIES, PIDS, PASSAGES), torch.tensor([[2.0, 0, 1], [0, 0, 0]]))
    assert oracle.identity == judges.LabelOracle({"q2": {}, "q1": {"c": 1, "a": 2}}).identity
    assert oracle.identity != judges.LabelOracle({"q1": {"a": 1}}).identity


def test_bi_encoder_teacher_is_cosine(tiny_bi_encoder_path):
    from sentence_transformers import SentenceTransformer

    teacher = judges.BiEncoderTeacher(tiny_bi_encoder_path)
    got = teacher.score(QIDS, QUERIES, PIDS, PASSAGES)
    st = SentenceTransformer(str(tiny_bi_encoder_path))
    q = st.encode_query(QUERIES, convert_to_tensor=True)
    for i in range(2):
        d = st.encode_document(PASSAGES[i], convert_to_tensor=True)
        assert torch.allclose(got[i], torch.cosine_similarity(q[i][None], d), atol=1e-5)
    assert set(teacher._doc) == {"a", "b", "c", "d", "e"}  # passage "a" embedded once
    assert teacher.identity == judges.BiEncoderTeacher(st).identity  # path or object: same content


def test_bi_encoder_teacher_encodes_each_query_once(tiny_bi_encoder_path):
    # ScoreCache sends misses as one (query, passage) row each: K rows of one query must not cost K encodes.
    teacher = judges.BiEncoderTeacher(tiny_bi_encoder_path)
    encoded = []
    encode_query = teacher.model.encode_query
    teacher.model.encode_query = lambda texts, **kw: encoded.extend(texts) or encode_query(texts, **kw)
    rows = [(i, j) for i in range(2) for j in range(3)]
    got = teacher.score([QIDS[i] for i, _ in rows], [QUERIES[i] for i, _ in rows], [[PIDS[i][j]] for i, j in rows],
                        [[PASSAGES[i][j]] for i, j in rows])
    assert sorted(encoded) == sorted(QUERIES)
    assert torch.allclose(got.reshape(2, 3), judges.BiEncoderTeacher(tiny_bi_encoder_path).score(
        QIDS, QUERIES, PIDS, PASSAGES), atol=1e-6)
    teacher.score(QIDS, QUERIES, PIDS, PASSAGES)
    assert sorted(encoded) == sorted(QUERIES)  # seen before: no new encode


class Counting:
    def __init__(self, identity="count", fail=None):
        self.identity, self.calls, self.fail = identity, [], fail or (lambda qids: None)

    def score(self, query_ids, queries, passage_ids, passages):
        self.calls.append([(q, p) for q, row in zip(query_ids, passage_ids) for p in row])
        out = self.fail(query_ids)
        if out is not None:
            return out
        return torch.tensor([[float(len(p)) for p in row] for row in passages])


def test_score_cache_hits_persistence_and_identity(tmp_path):
    path = tmp_path / "lsr.sqlite"
    judge = Counting()
    cache = judges.ScoreCache(judge, path)
    first = cache.score(QIDS, QUERIES, PIDS, PASSAGES)
    expected = torch.tensor([[float(len(p)) for p in row] for row in PASSAGES])
    assert torch.equal(first, expected) and len(judge.calls) == 1 and len(judge.calls[0]) == 6
    assert cache.stats()["misses"] == 6 and cache.stats()["hits"] == 0
    assert torch.equal(cache.score(QIDS, QUERIES, PIDS, PASSAGES), expected)
    assert len(judge.calls) == 1 and cache.stats()["hits"] == 6  # second call: no judge call
    # partial overlap: only the new pair is sent
    cache.score(["q1"], [QUERIES[0]], [["a", "z"]], [["cats purr when content", "zz"]])
    assert judge.calls[-1] == [("q1", "z")]
    # a new instance on the same file (a restarted run) hits; another identity does not
    judge2 = Counting()
    again = judges.ScoreCache(judge2, path)
    assert torch.equal(again.score(QIDS, QUERIES, PIDS, PASSAGES), expected) and judge2.calls == []
    other = Counting(identity="other")
    judges.ScoreCache(other, path).score(QIDS, QUERIES, PIDS, PASSAGES)
    assert len(other.calls) == 1


def test_failure_policies():
    def raise_on_q2(qids):
        if "q2" in qids:
            raise RuntimeError("backend down")

    with pytest.raises(JudgeError, match="backend down"):
        judges.ScoreCache(Counting(fail=raise_on_q2), None).score(QIDS, QUERIES, PIDS, PASSAGES)
    cache = judges.ScoreCache(Counting(fail=raise_on_q2), None, on_failure="skip_query")
    scores, skipped = cache.score_with_skips(QIDS, QUERIES, PIDS, PASSAGES)
    assert skipped.tolist() == [False, True] and torch.isnan(scores[1]).all() and torch.isfinite(scores[0]).all()
    assert cache.stats()["skipped_queries"] == 1
    # NaN from the judge: only that query is skipped, and nothing invalid is cached
    nan_q1 = Counting(fail=lambda qids: torch.tensor([[math.nan] if q == "q1" else [1.0] for q in qids]))
    cache = judges.ScoreCache(nan_q1, None, on_failure="skip_query")
    scores, skipped = cache.score_with_skips(QIDS, QUERIES, PIDS, PASSAGES)
    assert skipped.tolist() == [True, False] and torch.equal(scores[1], torch.ones(3))
    cache.score_with_skips(QIDS, QUERIES, PIDS, PASSAGES)
    assert cache.stats()["hits"] == 3 and cache.stats()["skipped_queries"] == 2
    with pytest.raises(JudgeError, match="NaN"):
        judges.ScoreCache(nan_q1, None).score(QIDS, QUERIES, PIDS, PASSAGES)
    # wrong shape
    with pytest.raises(JudgeError, match="shape"):
        judges.ScoreCache(Counting(fail=lambda qids: torch.zeros(2)), None).score(QIDS, QUERIES, PIDS, PASSAGES)
    # timeouts, on a callable judge and through the cache
    slow = judges.CallableJudge(lambda *a: time.sleep(0.5) or [[0.0]], "slow", timeout=0.05)
    with pytest.raises(JudgeError, match="timed out"):
        slow.score(["q1"], ["x"], [["a"]], [["y"]])
    cache = judges.ScoreCache(judges.CallableJudge(lambda *a: time.sleep(0.5), "slow2"), None, timeout=0.05,
                              on_failure="skip_query")
    assert cache.score_with_skips(["q1"], ["x"], [["a"]], [["y"]])[1].tolist() == [True]


def test_pick_top_and_sample_frequencies():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert judges.pick(s, 2, policy="top").tolist() == [[1, 3]]
    g = torch.Generator().manual_seed(0)
    n, temp = 20000, 0.5
    first = judges.pick(s.expand(n, 4), 1, policy="sample", temperature=temp, generator=g)[:, 0]
    freq = torch.bincount(first, minlength=4).float() / n
    p = (s[0] / temp).softmax(0)
    chi2 = (n * (freq - p) ** 2 / p).sum().item()
    assert chi2 < 16.3  # chi-square, 3 dof, p = 0.001
    two = judges.pick(s.expand(1000, 4), 2, policy="sample", temperature=temp, generator=g)
    assert (two[:, 0] != two[:, 1]).all()  # without replacement
    cold = judges.pick(s.expand(100, 4), 2, policy="sample", temperature=1e-4, generator=g)
    assert (cold == torch.tensor([1, 3])).all()
    with pytest.raises(ValueError, match="NaN"):
        judges.pick(torch.tensor([[math.nan, 1.0]]), 1)


def test_to_reward():
    s = torch.tensor([[0.2, -0.5, 3.0]])
    with pytest.raises(ValueError, match="clip"):
        judges.to_reward(s, "identity")
    assert torch.equal(judges.to_reward(s.abs(), "identity"), s.abs())
    assert torch.equal(judges.to_reward(s, "clip"), torch.tensor([[0.2, 0.0, 3.0]]))
    assert torch.allclose(judges.to_reward(s, "sigmoid"), torch.sigmoid(s))
    with pytest.raises(ValueError, match="NaN"):
        judges.to_reward(torch.tensor([math.nan]), "clip")
