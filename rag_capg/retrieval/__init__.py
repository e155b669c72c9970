"""Data and the early-stage ranker: loading corpora and queries (data, demo_corpus, inputs) and the
bi-encoder's encoding, index and logits (retriever)."""

from rag_capg.retrieval.data import Corpus, QuerySet, load_corpus, load_dataset_splits, load_queries
from rag_capg.retrieval.inputs import as_corpus, as_queries

__all__ = ["Corpus", "QuerySet", "load_corpus", "load_queries", "load_dataset_splits", "as_corpus", "as_queries"]
