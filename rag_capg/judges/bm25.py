"""BM25 over the training corpus as a judge (``lsr=bm25``): lexical evidence with no model and no labels.

A raw BM25 score has no fixed scale: it grows with the query's length and the rarity of its terms, so the
same number means "strong" for one query and "weak" for another. The judge therefore standardises each
query's scores over the WHOLE corpus,

    z(q, d) = (bm25(q, d) - mean_q) / std_q,   mean_q, std_q over all N passages (population std),

which bm25s gives cheaply: ``get_scores`` scores one query against every passage in one sparse pass. z is
pointwise (it depends on q and d only, never on which other candidates share a list), as the score cache
requires, and it is in the same units as any other member standardised this way (judges.ensemble). A query
none of whose terms occurs in the corpus (std_q = 0) scores z = 0 everywhere: BM25 has nothing to say.
Use ``reward_mapping=sigmoid`` (or ``clip``): z is signed.

The index is built once per (corpus, options) and kept under ``cache_dir/bm25/`` (bm25s' own format, written
to a temporary folder and renamed into place), so later runs only load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rag_capg.errors import InputError
from rag_capg.io import atomic_dir
from rag_capg.judges.base import short_hash

# PyStemmer's Snowball algorithms (3.x) and bm25s' stop-word lists, by their full names; "none" = off
Stemmer = Literal["none", "arabic", "armenian", "basque", "catalan", "czech", "danish", "dutch", "dutch_porter",
                  "english", "esperanto", "estonian", "finnish", "french", "german", "greek", "hindi", "hungarian",
                  "indonesian", "irish", "italian", "lithuanian", "nepali", "norwegian", "persian", "polish", "porter",
                  "portuguese", "romanian", "russian", "serbian", "sesotho", "spanish", "swedish", "tamil", "turkish",
                  "yiddish"]
Stopwords = Literal["none", "english", "english_plus", "german", "dutch", "french", "spanish", "portuguese",
                    "italian", "russian", "swedish", "norwegian", "chinese", "turkish", "korean", "danish"]


def make_stemmer(name: str | None):
    """PyStemmer's Snowball stemmer for ``name`` ("english", "french", ...), or None for "none"/None."""
    if name in (None, "none"):
        return None
    try:
        import Stemmer
    except ImportError:
        raise InputError("the Snowball stemmer needs PyStemmer: pip install PyStemmer (or lsr_bm25_stemmer=none)",
                         field="lsr_bm25_stemmer") from None
    if name not in Stemmer.algorithms():
        raise InputError(f"{name!r} is not a PyStemmer language (one of: {', '.join(Stemmer.algorithms())}; "
                         "or none)", field="lsr_bm25_stemmer")
    return Stemmer.Stemmer(name)


def check_stopwords(name: str | None) -> list[str] | str | None:
    """bm25s' stop-word list name ("english" / "en", "german" / "de", ...), or None for "none"/None."""
    if name in (None, "none"):
        return None
    from bm25s.tokenization import _infer_stopwords

    try:
        _infer_stopwords(name)
    except ValueError as err:
        raise InputError(f"{name!r} is not a bm25s stop-word list ({err}); or none", field="lsr_bm25_stopwords") \
            from None
    return name


class BM25Judge:
    """BM25 (bm25s, Lucene variant) of a query against the corpus, standardised over the whole corpus.

    The score of (q, d) is z = (bm25(q, d) - mean_q) / std_q over all N passages (module docstring). Passages
    are looked up by id in the index, so a passage id outside ``corpus`` is an error.

    Args:
        corpus: a ``rag_capg.retrieval.data.Corpus`` (title + text, as every other model sees it).
        stemmer: PyStemmer language for the Snowball stemmer, or "none".
        stopwords: bm25s stop-word list ("english", "de", ...), or "none".
        k1, b: BM25 term-frequency saturation and length normalisation.
        cache_dir: the index is stored under ``cache_dir/bm25/<corpus fingerprint>-<options>/``; None = in memory.

    Example:
        >>> judge = BM25Judge(corpus, cache_dir=".cache/rag-capg")
        >>> judge.score(["q1"], ["why do cats purr"], [["d1", "d2"]], [["...", "..."]])  # (1, 2) z-scores
    """

    def __init__(self, corpus, *, stemmer: str | None = "english", stopwords: str | None = "english",
                 k1: float = 1.5, b: float = 0.75, cache_dir: str | Path | None = None, show_progress: bool = False):
        import bm25s

        self.corpus, self.k1, self.b = corpus, k1, b
        self.stemmer_name, self.stopwords = stemmer or "none", check_stopwords(stopwords)
        self._stemmer = make_stemmer(stemmer)
        options = json.dumps({"stemmer": self.stemmer_name, "stopwords": self.stopwords or "none", "k1": k1, "b": b,
                              "method": "lucene", "bm25s": bm25s.__version__})
        self.identity = f"BM25Judge:{corpus.fingerprint}:{short_hash(options)}"
        self.index_dir = None if cache_dir is None else \
            Path(cache_dir) / "bm25" / f"{corpus.fingerprint}-{short_hash(options)}"
        self.retriever = self._load_or_build(show_progress)

    def _tokenize(self, texts: list[str], *, return_ids: bool, show_progress: bool = False):
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords, stemmer=self._stemmer, return_ids=return_ids,
                              show_progress=show_progress)

    def _load_or_build(self, show_progress: bool):
        import bm25s

        if self.index_dir is not None and (self.index_dir / "params.index.json").is_file():
            retriever = bm25s.BM25.load(str(self.index_dir), show_progress=False)
            if retriever.scores.get("num_docs") == len(self.corpus):
                return retriever
        retriever = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        retriever.index(self._tokenize(list(self.corpus.texts), return_ids=True, show_progress=show_progress),
                        show_progress=show_progress)
        if self.index_dir is not None:
            with atomic_dir(self.index_dir) as tmp:
                retriever.save(str(tmp), show_progress=False)
        return retriever

    def bm25_scores(self, query: str) -> np.ndarray:
        """Raw BM25 scores (N,) float32 of ``query`` against every passage, in corpus order."""
        tokens = self._tokenize([query], return_ids=False)[0]
        # terms the corpus never uses are dropped; no term left scores 0 everywhere
        return self.retriever.get_scores_from_ids(self.retriever.get_tokens_ids(tokens))

    def corpus_z(self, query: str) -> np.ndarray:
        """z-scores (N,) float64 of ``query`` against every passage: (bm25 - mean) / std over the corpus."""
        raw = self.bm25_scores(query).astype(np.float64)
        mean, std = raw.mean(), raw.std()
        return (raw - mean) / std if std > 0 else np.zeros_like(raw)

    def corpus_moments(self, query_ids: list[str], queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (B,) of this judge's scores over the whole corpus: (0, 1), or (0, 0) for a query whose
        BM25 is constant (no term in the corpus). What judges.ensemble standardises a member with."""
        std = torch.tensor([1.0 if self.bm25_scores(q).std() > 0 else 0.0 for q in queries], dtype=torch.float64)
        return torch.zeros(len(queries), dtype=torch.float64), std

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        rows = {}
        for q in dict.fromkeys(queries):
            rows[q] = self.corpus_z(q)
        out = []
        for q, ids in zip(queries, passage_ids):
            missing = [p for p in ids if p not in self.corpus.index_of]
            if missing:
                raise ValueError(f"passage id {missing[0]!r} is not in the BM25 judge's corpus")
            out.append(rows[q][[self.corpus.index_of[p] for p in ids]])
        return torch.tensor(np.array(out, dtype=np.float64).reshape(len(queries), -1), dtype=torch.float32)
