"""Corpus, queries and relevance labels, from a BEIR folder, plain JSONL, a Hugging Face dataset or the demo.

Every source ends in the same two objects: a `Corpus` (passage ids and texts, in file order) and a `QuerySet`
(query ids, texts and graded qrels for one split). Passage text follows the MTEB/BEIR convention:
``title + " " + text`` when a non-empty title exists, else ``text``.

Bad input raises one `InputError` naming the file, the line and the field, so a user with a 5 GB corpus
learns *where* the problem is without a traceback. BEIR JSONL is parsed line by line with `json` (not with
`datasets`) for exactly that reason; `datasets` is only used for Hugging Face datasets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from rag_capg.errors import InputError
from rag_capg.io import read_text_lines

DEMO_PREFIX = "demo:"
# A row source: (where, line number, row dict or raw value). `where` names the file (or HF config/split).
Rows = Iterable[tuple[str, int, Any]]


@dataclass
class Corpus:
    """Passages in a fixed order: row i of every embedding matrix is passage ``ids[i]``."""

    ids: list[str]
    texts: list[str]
    fingerprint: str = ""  # filled in __post_init__ when empty
    index_of: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        if len(self.ids) != len(self.texts):
            raise ValueError(f"Corpus: {len(self.ids)} ids but {len(self.texts)} texts")
        if not self.index_of:
            self.index_of = {pid: i for i, pid in enumerate(self.ids)}
        if len(self.index_of) != len(self.ids):
            raise ValueError("Corpus: passage ids are not unique")
        if not self.fingerprint:
            self.fingerprint = corpus_fingerprint(self.ids, self.texts)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class QuerySet:
    """Queries of one split. ``qrels[qid]`` maps passage id -> grade > 0; ``{}`` for an unlabelled query."""

    ids: list[str]
    texts: list[str]
    qrels: dict[str, dict[str, int]]
    split: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return any(self.qrels.get(q) for q in self.ids)

    def subset(self, indices: Iterable[int], split: str | None = None) -> "QuerySet":
        """The queries at ``indices``, in that order, with their labels."""
        indices = list(indices)
        return QuerySet(ids=[self.ids[i] for i in indices], texts=[self.texts[i] for i in indices],
                        qrels={self.ids[i]: self.qrels.get(self.ids[i], {}) for i in indices},
                        split=self.split if split is None else split)

    def head(self, n: int | None) -> "QuerySet":
        """The first ``n`` queries (all of them when n is None or larger)."""
        return self if n is None or n >= len(self) else self.subset(range(n))


def corpus_fingerprint(ids: list[str], texts: list[str]) -> str:
    """sha256 over (id, text) pairs, 16 hex digits: the key of embedding caches.

    Each pair is JSON-encoded on its own line, so no choice of ids and texts can make two different corpora
    hash the same byte stream (a plain concatenation would let ("ab","c") collide with ("a","bc")).
    """
    h = hashlib.sha256()
    for pid, text in zip(ids, texts):
        h.update(json.dumps([pid, text], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def check_candidate_size(k: int, corpus: Corpus, *, field: str = "num_candidates") -> None:
    """Plackett-Luce draws K passages without replacement, so K cannot exceed the corpus size."""
    if k > len(corpus):
        raise InputError(f"{k} candidates per query requested but the corpus {corpus.source or ''} has only "
                         f"{len(corpus)} passages; lower it to at most {len(corpus)}", field=field)
    if k < 1:
        raise InputError(f"must be at least 1, got {k}", field=field)


# --------------------------------------------------------------------------------------------- row sources


def _jsonl_rows(path: Path, what: str = "JSONL file") -> Iterator[tuple[str, int, Any]]:
    for line_no, line in read_text_lines(path, what=what):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"corrupt JSON ({e.msg} at column {e.colno})", file=path, line=line_no,
                             field="<json>") from None
        yield str(path), line_no, row


def _id_of(row: Any, where: str, line: int) -> str:
    if not isinstance(row, dict):
        raise InputError(f"expected a JSON object, got {type(row).__name__}", file=where, line=line,
                         field="<json>")
    if "_id" not in row or row["_id"] is None:
        raise InputError("missing", file=where, line=line, field="_id")
    pid = row["_id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):  # BEIR ids are strings; ints are common
        raise InputError(f"must be a string, got {type(pid).__name__}", file=where, line=line, field="_id")
    pid = str(pid)
    if not pid:
        raise InputError("empty id", file=where, line=line, field="_id")
    return pid


def _text_of(row: dict, key: str, where: str, line: int, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise InputError("missing", file=where, line=line, field=key)
        return ""
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {type(value).__name__}", file=where, line=line, field=key)
    return value


def _read_id_text(rows: Rows, *, with_title: bool) -> tuple[list[str], list[str], str | None]:
    ids, texts, seen, where = [], [], {}, None
    for where, line, row in rows:
        pid = _id_of(row, where, line)
        if pid in seen:
            raise InputError(f"duplicate id {pid!r} (first at line {seen[pid]}, again at line {line})",
                             file=where, line=line, field="_id")
        seen[pid] = line
        text = _text_of(row, "text", where, line)
        title = _text_of(row, "title", where, line, required=False).strip() if with_title else ""
        ids.append(pid)
        texts.append(f"{title} {text}" if title else text)
    return ids, texts, where


def _qrels_tsv_rows(path: Path) -> Iterator[tuple[str, int, tuple[str, str, str]]]:
    """BEIR qrels: ``query-id<TAB>corpus-id<TAB>score`` with a header; CRLF and extra columns are fine."""
    for line_no, line in read_text_lines(path, what="qrels TSV file"):
        if not line.strip():
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if line_no == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid", "query"):
            continue  # header
        if len(cols) < 3:
            raise InputError(f"expected 3 tab-separated columns (query-id, corpus-id, score), got "
                             f"{len(cols)}", file=path, line=line_no, field="score")
        yield str(path), line_no, (cols[0].strip(), cols[1].strip(), cols[2].strip())


def parse_grade(score: Any) -> int:
    """A relevance grade as an integer: "2", 2, "1.0" and 1.0 are fine; "0.5" raises ValueError rather than
    being truncated to 0 (which would silently drop a judged-relevant pair, and perhaps its query)."""
    if isinstance(score, bool):
        raise ValueError(score)
    if isinstance(score, int):
        return score
    value = float(score)  # ValueError / TypeError for text
    if not value.is_integer():
        raise ValueError(score)
    return int(value)


def _read_qrels(rows: Rows, query_ids: set[str], corpus: Corpus) -> dict[str, dict[str, int]]:
    """qid -> {pid: grade} keeping grade > 0 only (grade 0 is an explicit "not relevant" judgement)."""
    qrels: dict[str, dict[str, int]] = {}
    for where, line, (qid, pid, score) in rows:
        try:
            grade = parse_grade(score)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"a relevance grade must be an integer (0, 1, 2, ...), got {score!r}; rescale "
                             "fractional labels to integers", file=where, line=line, field="score") from None
        if qid not in query_ids:
            raise InputError(f"unknown query id {qid!r} (not in the queries file)", file=where, line=line,
                             field="query-id")
        if pid not in corpus.index_of:
            raise InputError(f"unknown passage id {pid!r} (not in the corpus)", file=where, line=line,
                             field="corpus-id")
        judged = qrels.setdefault(qid, {})
        if grade > 0:
            judged[pid] = max(grade, judged.get(pid, 0))
    return qrels


# -------------------------------------------------------------------------------------- Hugging Face layout


def _is_hf_saved(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _hf_split(dataset: str, config: str, split: str | None = None):
    """One split of one config of a HF dataset in the mteb layout (local dir saved by save_to_disk, local
    dataset repo, or Hub id). Returns (where, datasets.Dataset); InputError naming the available splits."""
    import datasets

    path = Path(dataset).expanduser()
    subdir = path / ("qrels" if config == "default" else config)
    if path.is_dir() and _is_hf_saved(path):  # one DatasetDict with splits corpus, queries, train, test...
        loaded = datasets.load_from_disk(str(path))
        if split is None:
            split = config
    elif path.is_dir() and subdir.is_dir() and _is_hf_saved(subdir):  # corpus/, queries/, qrels/ saved apart
        loaded = datasets.load_from_disk(str(subdir))
    else:
        try:
            loaded = datasets.load_dataset(dataset, config)
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not path.exists():  # a mistyped relative folder looks like a Hub id: say both
                raise InputError(f"no such folder ({path.absolute()}), and cannot load it as a Hugging Face "
                                 f"dataset id ({reason})", file=dataset, field="dataset") from None
            raise InputError(f"cannot load config {config!r} with `datasets.load_dataset`: {reason}",
                             file=dataset) from None
    if isinstance(loaded, datasets.Dataset):
        return f"{dataset}[{config}]", loaded
    names = list(loaded.keys())
    if split is None:  # corpus / queries configs hold a single split ("corpus", "queries")
        split = config if config in names else names[0]
    if split not in names:
        raise InputError(f"split {split!r} does not exist; available: {', '.join(names)}", file=dataset,
                         field="split")
    return f"{dataset}[{config}/{split}]", loaded[split]


def _hf_rows(where: str, ds, columns: tuple[str, ...]) -> Iterator[tuple[str, int, Any]]:
    missing = [c for c in columns[:2] if c not in ds.column_names]
    if missing:
        raise InputError(f"missing column (columns are {ds.column_names})", file=where, field=missing[0])
    present = [c for c in columns if c in ds.column_names]
    data = ds.select_columns(present).to_dict()  # columnar -> fast for a few million rows
    for i in range(ds.num_rows):
        yield where, i + 1, {c: data[c][i] for c in present}


def _hf_qrels_rows(where: str, ds) -> Iterator[tuple[str, int, tuple[str, str, str]]]:
    for w, line, row in _hf_rows(where, ds, ("query-id", "corpus-id", "score")):
        yield w, line, (str(row["query-id"]), str(row["corpus-id"]), str(row.get("score", 1)))


# ---------------------------------------------------------------------------------------------- resolving


def _resolve(dataset: str | None) -> tuple[str, Path | None]:
    """-> ("beir", folder) | ("hf", None) | ("none", None). Demo datasets become BEIR folders."""
    if not dataset:
        return "none", None
    if dataset.startswith(DEMO_PREFIX):
        from rag_capg.retrieval import demo_corpus

        return "beir", demo_corpus.demo_dir(dataset[len(DEMO_PREFIX):])
    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            return "beir", path
        return "hf", None
    if path.exists():
        raise InputError("expected a dataset folder (BEIR layout or a Hugging Face dataset), got a file; pass "
                         "JSONL files with corpus_file= / queries_file=", file=dataset)
    # Not a local path: a Hub id looks like "name" or "owner/name"; anything else is a missing folder.
    looks_like_hub_id = dataset.count("/") <= 1 and not dataset.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise InputError("dataset path does not exist", file=dataset)
    return "hf", None


def load_corpus(dataset: str, *, corpus_file: str | None = None) -> Corpus:
    """Load the passages of ``dataset`` (BEIR folder, HF dir / Hub id, "demo:stdlib"), or of ``corpus_file``
    (JSONL with ``_id``, ``text``, optional ``title``) when given."""
    if corpus_file is not None:
        path = Path(corpus_file).expanduser()
        ids, texts, _ = _read_id_text(_jsonl_rows(path, "corpus JSONL file"), with_title=True)
        source = str(path)
    else:
        kind, folder = _resolve(dataset)
        if kind == "none":
            raise InputError("give a dataset or a corpus file", field="dataset")
        if kind == "beir":
            path = folder / "corpus.jsonl"
            ids, texts, _ = _read_id_text(_jsonl_rows(path, "corpus JSONL file"), with_title=True)
            source = str(path) if not dataset.startswith(DEMO_PREFIX) else dataset
        else:
            where, ds = _hf_split(dataset, "corpus")
            ids, texts, _ = _read_id_text(_hf_rows(where, ds, ("_id", "text", "title")), with_title=True)
            source = dataset
    if not ids:
        raise InputError("empty corpus: no passages", file=corpus_file or source)
    return Corpus(ids=ids, texts=texts, source=source)


def load_queries(dataset: str, split: str, corpus: Corpus, *, queries_file: str | None = None,
                 qrels_file: str | None = None, require_labels: bool = True) -> QuerySet:
    """Queries of ``split`` with their qrels.

    Labelled (the default): the queries that have at least one relevant passage in the split's qrels, in
    queries-file order. ``require_labels=False`` (training with a model LSR): the queries the split's qrels
    list, labels or not. Every query of the queries file, with ``{}`` labels, only where no other split could
    leak into training: the queries come from a ``queries_file`` you gave, or a BEIR folder has no qrels at all
    (no ``qrels/*.tsv``).
    A split the dataset lacks is otherwise an InputError naming the splits it has (``train_split=trian`` must
    not train on the test queries). ``queries_file`` / ``qrels_file`` override the dataset's own files.
    """
    kind, folder = _resolve(dataset)
    # 1. query rows
    if queries_file is not None:
        q_where: str | Path = Path(queries_file).expanduser()
        q_rows: Rows = _jsonl_rows(q_where, "queries JSONL file")
    elif kind == "beir":
        q_where = folder / "queries.jsonl"
        q_rows = _jsonl_rows(q_where, "queries JSONL file")
    elif kind == "hf":
        q_where, q_ds = _hf_split(dataset, "queries")
        q_rows = _hf_rows(q_where, q_ds, ("_id", "text"))
    else:
        raise InputError("give a dataset or a queries file", field="dataset")
    ids, texts, _ = _read_id_text(q_rows, with_title=False)
    if not ids:  # said here, before the qrels' first query id is reported as unknown
        raise InputError("no queries: the file holds no query", file=q_where)
    # 2. qrel rows (None = this split has no labels)
    qrel_rows: Rows | None = None
    qrels_where: str | Path = qrels_file or dataset
    if qrels_file is not None:
        qrel_rows = _qrels_tsv_rows(Path(qrels_file).expanduser())
    elif kind == "beir":
        tsv = folder / "qrels" / f"{split}.tsv"
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        if tsv.is_file():
            qrel_rows, qrels_where = _qrels_tsv_rows(tsv), tsv
        elif require_labels or (available and queries_file is None):
            raise InputError(f"split {split!r} does not exist; available: {', '.join(available) or 'none'}",
                             file=folder / "qrels", field="split")
    elif kind == "hf":
        try:
            qrel_rows = _hf_qrels_rows(*_hf_split(dataset, "default", split))
        except InputError:  # without the split's qrels, only queries you gave yourself are trained on
            if require_labels or queries_file is None:
                raise
    elif require_labels:
        raise InputError("labels required but no qrels file given", field="qrels_file")
    if qrel_rows is None:
        return QuerySet(ids=ids, texts=texts, qrels={q: {} for q in ids}, split=split)
    qrels = _read_qrels(qrel_rows, set(ids), corpus)
    keep = [i for i, q in enumerate(ids) if (qrels.get(q) if require_labels else q in qrels)]
    if require_labels and not keep:
        raise InputError(f"split {split!r} has no query with a relevant passage (grade > 0)",
                         file=qrels_where, field="score")
    return QuerySet(ids=[ids[i] for i in keep], texts=[texts[i] for i in keep],
                    qrels={ids[i]: qrels.get(ids[i], {}) for i in keep}, split=split)


def load_dataset_splits(dataset: str, splits: Iterable[str], **kwargs) -> tuple[Corpus, dict[str, QuerySet]]:
    """Convenience: the corpus and several labelled splits at once."""
    corpus = load_corpus(dataset, corpus_file=kwargs.pop("corpus_file", None))
    return corpus, {s: load_queries(dataset, s, corpus, **kwargs) for s in splits}

