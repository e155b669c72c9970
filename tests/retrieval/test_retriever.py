"""ESR: loading, cached corpus encoding, query-tower Router model, autograd embeddings, logits, top-k,
and the restricted (top-M + sampled tail) softmax."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import pytest
import torch
from sentence_transformers import SentenceTransformer

from rag_capg.errors import InputError
from rag_capg.retrieval import retriever


@dataclass
class FakeCorpus:
    """The fields of rag_capg.retrieval.data.Corpus that encode_corpus reads."""

    ids: list[str]
    texts: list[str]
    fingerprint: str = field(init=False)

    def __post_init__(self):
        self.fingerprint = hashlib.sha256("\x00".join(self.ids + self.texts).encode()).hexdigest()[:16]

    def __len__(self):
        return len(self.ids)


TEXTS = [f"passage {i} about {w}" for i, w in enumerate(["cats", "rockets", "bread", "glaciers", "bees", "tea",
                                                          "owls", "tides", "copper", "lava", "moss"])]


@pytest.fixture(scope="module")
def model(tiny_bi_encoder_path):
    return retriever.load_bi_encoder(str(tiny_bi_encoder_path), device="cpu")


def test_load_rejects_non_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=str(tmp_path)):
        retriever.load_bi_encoder(str(tmp_path))


def test_encode_corpus_cache_hit_and_invalidation(model, tmp_path, monkeypatch, tiny_bi_encoder_path):
    calls = []
    real = SentenceTransformer.encode_document
    monkeypatch.setattr(SentenceTransformer, "encode_document",
                        lambda self, texts, **kw: calls.append(len(texts)) or real(self, texts, **kw))
    corpus = FakeCorpus([f"d{i}" for i in range(len(TEXTS))], TEXTS)
    a = retriever.encode_corpus(model, corpus, cache_dir=tmp_path, normalize=True, show_progress=False)
    assert calls == [len(TEXTS)] and a.shape == (len(TEXTS), 32) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    b = retriever.encode_corpus(model, corpus, cache_dir=tmp_path, normalize=True, show_progress=False)
    assert calls == [len(TEXTS)] and torch.equal(a, b)  # hit: no encoding
    expected = model.encode_document(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(a, expected, atol=1e-6)
    calls.clear()
    # normalize, corpus text and model weights are all part of the key
    retriever.encode_corpus(model, corpus, cache_dir=tmp_path, normalize=False, show_progress=False)
    assert len(calls) == 1
    changed = FakeCorpus(corpus.ids, TEXTS[:-1] + ["a different last passage"])
    retriever.encode_corpus(model, changed, cache_dir=tmp_path, normalize=True, show_progress=False)
    assert len(calls) == 2
    other = retriever.load_bi_encoder(str(tiny_bi_encoder_path), device="cpu")
    assert retriever.model_fingerprint(other) == retriever.model_fingerprint(model)  # content, not object
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3
    assert retriever.model_fingerprint(other) != retriever.model_fingerprint(model)
    retriever.encode_corpus(other, corpus, cache_dir=tmp_path, normalize=True, show_progress=False)
    assert len(calls) == 3


def test_encode_corpus_one_process_accelerator(model, tmp_path):
    from accelerate import Accelerator

    corpus = FakeCorpus([f"d{i}" for i in range(len(TEXTS))], TEXTS)
    acc = Accelerator(cpu=True)
    a = retriever.encode_corpus(model, corpus, cache_dir=None, accelerator=acc, normalize=False, show_progress=False)
    assert torch.allclose(a, model.encode_document(TEXTS, convert_to_tensor=True), atol=1e-6)


def test_query_tower_routes_and_round_trip(tiny_bi_encoder_path, tmp_path):
    model = retriever.load_bi_encoder(str(tiny_bi_encoder_path), device="cpu")
    qt = retriever.make_query_tower_model(model)
    assert not any(p.requires_grad for p in model.parameters())  # documented: the base is frozen in place
    base_doc = model.encode_document(TEXTS, convert_to_tensor=True)
    assert torch.allclose(qt.encode_document(TEXTS, convert_to_tensor=True), base_doc, atol=1e-6)
    assert torch.allclose(qt.encode_query(TEXTS, convert_to_tensor=True), base_doc, atol=1e-6)  # a copy at start
    assert retriever.model_fingerprint(qt) == retriever.model_fingerprint(model)  # shares the corpus cache
    trainable = [n for n, p in qt.named_parameters() if p.requires_grad]
    assert trainable and all(".query." in n for n in trainable)
    assert all(not p.requires_grad for n, p in qt.named_parameters() if ".document." in n)
    # train the query tower a little: only query embeddings move
    opt = torch.optim.SGD([p for p in qt.parameters() if p.requires_grad], lr=1.0)
    retriever.embed_with_grad(qt, TEXTS[:3], route="query").pow(2).sum().backward()
    opt.step()
    q1, d1 = qt.encode_query(TEXTS, convert_to_tensor=True), qt.encode_document(TEXTS, convert_to_tensor=True)
    assert not torch.allclose(q1, base_doc, atol=1e-4) and torch.allclose(d1, base_doc, atol=1e-6)
    qt.save(str(tmp_path / "qt"))
    back = SentenceTransformer(str(tmp_path / "qt"), device="cpu")
    assert torch.equal(back.encode_query(TEXTS, convert_to_tensor=True), q1)
    assert torch.equal(back.encode_document(TEXTS, convert_to_tensor=True), d1)
    # an exported query-tower model is unpacked, not nested
    again = retriever.make_query_tower_model(back)
    assert set(again[0].sub_modules) == {"query", "document"}
    assert torch.allclose(again.encode_query(TEXTS, convert_to_tensor=True), q1, atol=1e-6)


def test_embed_with_grad_matches_encode_and_has_gradients(model):
    model.eval()
    for route, enc in [("query", model.encode_query), ("document", model.encode_document)]:
        emb = retriever.embed_with_grad(model, TEXTS, route=route)
        assert emb.requires_grad
        assert torch.allclose(emb.detach(), enc(TEXTS, convert_to_tensor=True), atol=1e-5)
    model.zero_grad()
    retriever.embed_with_grad(model, TEXTS[:2], route="query").sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()
    q = retriever.encode_queries(model, TEXTS[:4], batch_size=2, normalize=True)
    assert q.shape == (4, 32) and not q.requires_grad


def _encoded_batch_sizes(model) -> list[int]:
    """Record the number of texts of every forward of the model's transformer (forward and recompute)."""
    sizes: list[int] = []
    first = next(m for m in model.modules() if type(m).__name__ == "Transformer")
    first.register_forward_pre_hook(lambda module, args: sizes.append(int(args[0]["input_ids"].shape[0])))
    return sizes


def _grads(model, texts, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    weights = torch.linspace(-1.0, 1.0, 32)
    emb = retriever.embed_with_grad(model, texts, route="document", **kw)
    (emb * weights).sum().backward()
    return emb.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_embed_with_grad_in_chunks_holds_at_most_a_chunk_and_gives_the_same_gradient(tiny_bi_encoder_path):
    model = retriever.load_bi_encoder(str(tiny_bi_encoder_path), device="cpu").eval()
    texts = TEXTS + [t + " and a much longer tail of words to pad" for t in TEXTS]  # 22 texts
    emb, grads = _grads(model, texts)
    sizes = _encoded_batch_sizes(model)
    emb_c, grads_c = _grads(model, texts, chunk_size=4)
    # every forward, in the first pass and in the backward recompute, saw at most 4 passages
    assert max(sizes) == 4 and sum(sizes) == 2 * len(texts)
    torch.testing.assert_close(emb_c, emb, atol=1e-6, rtol=1e-5)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-6, rtol=1e-4)
    # one chunk is the plain single pass, bit for bit
    sizes.clear()
    emb_1, grads_1 = _grads(model, texts, chunk_size=len(texts))
    assert sizes == [len(texts)] and torch.equal(emb_1, emb)
    assert all(torch.equal(grads_1[n], grads[n]) for n in grads)


def test_embed_with_grad_in_chunks_replays_the_dropout_masks(tiny_bi_encoder_path):
    # With dropout on, the recompute in backward must draw the masks the forward drew: the gradient equals
    # that of the same chunks encoded without checkpointing from the same RNG state.
    model = retriever.load_bi_encoder(str(tiny_bi_encoder_path), device="cpu").train()
    torch.manual_seed(5)
    emb_c, grads_c = _grads(model, TEXTS, chunk_size=3)
    torch.manual_seed(5)
    model.zero_grad()
    parts = [retriever.embed_with_grad(model, TEXTS[i:i + 3], route="document") for i in range(0, len(TEXTS), 3)]
    emb = torch.cat(parts)
    (emb * torch.linspace(-1.0, 1.0, 32)).sum().backward()
    assert torch.equal(emb_c, emb.detach())
    assert all(torch.equal(grads_c[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)
    torch.manual_seed(6)
    assert not torch.equal(retriever.embed_with_grad(model, TEXTS, route="document", chunk_size=3).detach(), emb_c)


def test_encoding_the_corpus_puts_a_training_model_back_in_training(model):
    # SentenceTransformer.encode() switches to eval(); a both_towers run with dropout re-indexes mid-training.
    model.train()
    corpus = FakeCorpus(ids=[str(i) for i in range(len(TEXTS))], texts=TEXTS)
    retriever.encode_corpus(model, corpus, cache_dir=None, normalize=True, show_progress=False)
    assert model.training and all(m.training for m in model.modules())
    retriever.encode_queries(model, TEXTS[:2], normalize=True)
    assert model.training
    model.eval()
    retriever.encode_queries(model, TEXTS[:2], normalize=True)
    assert not model.training


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_scores_brute_force(similarity):
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g)
    got = retriever.scores(q, d, similarity=similarity, tau=0.05)
    for i in range(3):
        for j in range(7):
            s = torch.dot(q[i], d[j]).item()
            if similarity == "cosine":
                s /= q[i].norm().item() * d[j].norm().item()
            assert math.isclose(got[i, j].item(), s / 0.05, rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("use_faiss", [False, True])
def test_chunked_top_k_equals_full(use_faiss):
    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(13, 8, generator=g), torch.randn(101, 8, generator=g)
    s, i = retriever.retrieve_top_k(q, d, 10, similarity="cosine", chunk_size=7, query_chunk_size=4,
                                    use_faiss=use_faiss)
    full = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
    fs, fi = full.topk(10, dim=1)
    assert torch.equal(i, fi) and torch.allclose(s, fs, atol=1e-5)
    with pytest.raises(ValueError, match="corpus size"):
        retriever.retrieve_top_k(q, d, 102, similarity="dot")


def test_topm_restricted_logits():
    g = torch.Generator().manual_seed(2)
    n, m, tau = 200, 20, 0.5
    d = torch.randn(n, 16, generator=g)
    q = torch.randn(4, 16, generator=g, requires_grad=True)
    index = retriever.TopMIndex(d, similarity="cosine")
    full = retriever.scores(q, d, similarity="cosine", tau=tau)
    # T = N - M draws are still with replacement; check the top-M part exactly and the tail mass in expectation
    r = index.restricted_logits(q, m, 50, tau=tau, generator=g)
    assert r.logits.shape == (4, m + 1) and r.indices.shape == (4, m)
    assert r.mask[:, m].all() and not r.mask[:, :m].any()
    assert torch.equal(r.indices, full.topk(m, dim=1).indices)
    assert torch.allclose(r.logits[:, :m], full.gather(1, r.indices), atol=1e-5)
    # the tail mass estimate is unbiased: average exp(pseudo-logit) over many draws
    true_tail = torch.logsumexp(full.scatter(1, r.indices, -math.inf), dim=1).exp().detach()
    est = torch.stack([index.restricted_logits(q, m, 50, tau=tau, generator=g).logits[:, m].exp().detach()
                       for _ in range(400)]).mean(0)
    assert torch.allclose(est, true_tail, rtol=0.05)
    # tail draws never hit the top-M; gradient reaches the query through both parts
    r.logits.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    trunc = index.restricted_logits(q, m, 0, tau=tau)
    assert torch.isinf(trunc.logits[:, m]).all()


def test_topm_with_an_inverted_file_index_and_its_search_parameters():
    # A large corpus swaps the exact index for an IVF one; probing every list must give the exact top-M,
    # probing one list is what search_params sets (and generally misses some).
    import faiss

    g = torch.Generator().manual_seed(3)
    d, q = torch.randn(2000, 16, generator=g), torch.randn(5, 16, generator=g)
    exact = retriever.TopMIndex(d, similarity="cosine").restricted_logits(q, 50, 0, tau=0.1)
    every = retriever.TopMIndex(d, similarity="cosine", factory="IVF16,Flat", search_params="nprobe=16")
    assert torch.equal(every.restricted_logits(q, 50, 0, tau=0.1).indices, exact.indices)
    one = retriever.TopMIndex(d, similarity="cosine", factory="IVF16,Flat", search_params="nprobe=1")
    assert faiss.extract_index_ivf(one.index).nprobe == 1


def test_topm_tail_draws_exclude_top():
    d = torch.eye(10)
    index = retriever.TopMIndex(d, similarity="dot")
    q = torch.tensor([[0, 0, 0, 5.0, 4, 0, 0, 3, 0, 0]])
    g = torch.Generator().manual_seed(0)
    # with M = 9 the only tail item is the smallest-logit one (several tie at 0; any is fine), and a
    # single tail draw gives exactly its mass: pseudo-logit = logit of the left-out item + log(1/1)
    r = index.restricted_logits(q, 9, 3, tau=1.0, generator=g)
    left_out = set(range(10)) - set(r.indices[0].tolist())
    assert len(left_out) == 1 and math.isclose(r.logits[0, 9].item(), q[0, left_out.pop()].item() + 0.0,
                                                abs_tol=1e-5)
