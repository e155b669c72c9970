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


def test_cross_encoder_judge_dtype_autocasts_the_encoder_and_keeps_the_logit_in_float32(tiny_cross_encoder_path):
    # "auto" on a CPU is float32 (same scores, same cache identity as before); bfloat16 runs the encoder's
    # linear layers in bf16 under autocast and the classifier in float32 (no 16-bit rounding of the score).
    full = judges.CrossEncoderJudge(tiny_cross_encoder_path)
    assert full.dtype == torch.float32 and full.identity == judges.CrossEncoderJudge(
        tiny_cross_encoder_path, dtype="float32").identity
    half = judges.CrossEncoderJudge(tiny_cross_encoder_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.identity != full.identity
    seen = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, out.dtype) and None

    for name, module in half.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record(name))
    got, ref = half.score(QIDS, QUERIES, PIDS, PASSAGES), full.score(QIDS, QUERIES, PIDS, PASSAGES)
    assert seen.pop(max(seen, key=lambda n: "classifier" in n)) == torch.float32  # the logits layer
    assert seen and all(dtype == torch.bfloat16 for dtype in seen.values())  # the encoder's layers
    assert torch.allclose(got, ref, atol=2e-2) and not torch.equal(got, ref)


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


def _scaled_lm(src, out, factor: float):
    """The tiny LM with its head scaled so that the yes/no logits sit around 10-30, where bf16 is coarse."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(src, out)
    lm = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(factor)
    lm.save_pretrained(out)
    return out


def test_llm_judge_reads_yes_and_no_in_float32_not_rounded_bf16_logits(tiny_causal_lm_path, tmp_path):
    # bf16 weights: the reference is the same bf16 model's final hidden state times the yes/no rows of its
    # head in float64. The model's own bf16 logits (what was read before) are rounded to steps of 0.125 at
    # 16-32, so their log-odds are multiples of 1/8 and P(yes) is off by up to a few percent.
    from transformers import AutoModelForCausalLM

    path = _scaled_lm(tiny_causal_lm_path, tmp_path / "lm", 400.0)
    judge = judges.LLMJudge(path, dtype=torch.bfloat16, batch_size=4)
    got = judge.score(QIDS, QUERIES, PIDS, PASSAGES).reshape(-1)
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    head = lm.get_output_embeddings().weight.detach().double()
    yes, no = judge.yes_ids[0], judge.no_ids[0]
    ref, old = [], []
    for q, row in zip(QUERIES, PASSAGES):
        for passage in row:
            ids = torch.tensor([judge.prompt_ids(q, passage)])
            with torch.no_grad():
                h = lm.model(input_ids=ids).last_hidden_state[0, -1].double()
                own = lm(input_ids=ids).logits[0, -1]
            ref.append(torch.sigmoid(h @ head[yes] - h @ head[no]))
            old.append(torch.sigmoid(own[yes].float() - own[no].float()))
            assert float(own[yes].float().abs()) > 8  # the regime where bf16 steps are >= 1/16
            assert float(((own[yes].float() - own[no].float()) * 16).frac().abs()) == 0.0  # the old log-odds grid
    ref, old = torch.stack(ref).float(), torch.stack(old)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert float((old - ref).abs().max()) > 10 * float((got - ref).abs().max())


def test_llm_judge_follows_a_soft_capped_head(tmp_path):
    # Gemma-style heads soft-cap their logits (cap * tanh(z / cap)); the float32 rows must do the same.
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from tests.conftest import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0,
                       pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(300.0)  # logits far past the cap
    model.save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe must accept the capped head
        judge = judges.LLMJudge(tmp_path / "gemma", batch_size=2)
    got = judge.score(QIDS, QUERIES, PIDS, PASSAGES)
    text = judge.prompt_ids(QUERIES[0], PASSAGES[0][1])
    with torch.no_grad():
        logits = judge.model(input_ids=torch.tensor([text])).logits[0, -1]
    assert float(logits.abs().max()) <= 2.0 + 1e-5  # capped by the model itself
    expected = torch.sigmoid(logits[judge.yes_ids[0]] - logits[judge.no_ids[0]])
    assert math.isclose(float(got[0, 1]), float(expected), abs_tol=1e-6)


def test_llm_judge_falls_back_to_the_model_logits_when_the_head_is_not_plain(tiny_causal_lm_path):
    judge = judges.LLMJudge(tiny_causal_lm_path)
    judge.model.config.final_logit_softcapping = 1e-3  # a transform this Llama does not apply: the probe sees it
    with pytest.warns(UserWarning, match="own logits"):
        assert judge._yes_no_head() is None
    judge._head = None
    reference = judges.LLMJudge(tiny_causal_lm_path)
    torch.testing.assert_close(judge.score(QIDS, QUERIES, PIDS, PASSAGES),
                               reference.score(QIDS, QUERIES, PIDS, PASSAGES), atol=1e-6, rtol=0)


def test_llm_judge_tokenises_once_sorts_batches_and_builds_no_cache(tiny_causal_lm_path, monkeypatch):
    judge = judges.LLMJudge(tiny_causal_lm_path, batch_size=2)
    expected = judges.LLMJudge(tiny_causal_lm_path, batch_size=1).score(QIDS, QUERIES, PIDS, PASSAGES)
    calls, texts = [], []
    forward = type(judge.tokenizer).__call__
    monkeypatch.setattr(type(judge.tokenizer), "__call__",
                        lambda self, t, **kw: texts.append(t) or forward(self, t, **kw))
    judge.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["use_cache"], kwargs["attention_mask"].sum(1).tolist())),
        with_kwargs=True)
    got = judge.score(QIDS, QUERIES, PIDS, PASSAGES)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)  # the caller's order, whatever the batches
    assert len(texts) == 1 and len(texts[0]) == 6  # one batched tokenizer call for the six pairs
    assert all(use_cache is False for use_cache, _ in calls)
    lengths = [n for _, batch in calls for n in batch]
    assert lengths == sorted(lengths, reverse=True) and len(calls) == 3  # batches of similar lengths


def test_llm_judge_cuts_the_passage_as_retokenising_would(tiny_causal_lm_path):
    # The fast path drops passage tokens of the one tokenisation; the slow path re-tokenises the prompt
    # around the cut passage (what every pair used to cost: up to four tokenisations). Same ids here.
    judge = judges.LLMJudge(tiny_causal_lm_path, max_length=40)
    for passage in ["word " * 200, "cats purr when content. " * 9, "x" * 500]:
        ids = judge.prompt_ids(QUERIES[0], passage)
        assert len(ids) <= 40 and ids == judge._cut_slow(QUERIES[0], passage)[-39:]


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
