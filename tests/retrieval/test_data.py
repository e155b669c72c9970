"""Data loading: BEIR folders, plain JSONL, Hugging Face layouts, and one clear error per kind of bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rag_capg.errors import InputError
from rag_capg.retrieval.data import (
    Corpus,
    QuerySet,
    check_candidate_size,
    corpus_fingerprint,
    load_corpus,
    load_queries,
)
from tests.conftest import write_beir_folder

CORPUS = [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": "d2", "title": "", "text": "dogs bark"},
          {"_id": "d3", "text": "owls hoot"}]
QUERIES = [{"_id": "q1", "text": "why do cats purr"}, {"_id": "q2", "text": "barking"},
           {"_id": "q3", "text": "night birds"}]


def small_beir(tmp_path: Path, qrels=None) -> Path:
    qrels = qrels or {"test": [("q1", "d1", 2), ("q2", "d2", 1), ("q3", "d3", 0)], "train": [("q3", "d3", 1)]}
    return write_beir_folder(tmp_path / "beir", CORPUS, QUERIES, qrels)


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def assert_error(exc: pytest.ExceptionInfo, file: Path | str, line: int | None, field: str, *words: str):
    err = exc.value
    assert str(file) in str(err) and Path(str(err.file)) == Path(file)
    assert err.line == line and err.field == field
    if line is not None:
        assert f":{line}:" in str(err)
    assert f"`{field}`" in str(err)
    for w in words:
        assert w in str(err), str(err)


# ------------------------------------------------------------------------------------------- happy paths


def test_beir_folder_titles_grades_and_splits(tmp_path):
    root = small_beir(tmp_path)
    corpus = load_corpus(str(root))
    assert corpus.ids == ["d1", "d2", "d3"] and len(corpus) == 3
    # MTEB/BEIR convention: title + " " + text when a non-empty title exists.
    assert corpus.texts == ["Cats cats purr", "dogs bark", "owls hoot"]
    assert corpus.index_of == {"d1": 0, "d2": 1, "d3": 2}
    test = load_queries(str(root), "test", corpus)
    # q3's only judgement has grade 0 (non-relevant): it carries no label and is not an eval query.
    assert test.ids == ["q1", "q2"] and test.texts == ["why do cats purr", "barking"]
    assert test.qrels == {"q1": {"d1": 2}, "q2": {"d2": 1}} and test.split == "test"
    assert load_queries(str(root), "train", corpus).qrels == {"q3": {"d3": 1}}


def test_crlf_qrels_and_extra_columns(tmp_path):
    root = small_beir(tmp_path)
    write_lines(root / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore\tnote", "q1\td1\t1\tx", "q2\td3\t2\ty",
                                              "q2\td2\t1\tz"], newline="\r\n")
    q = load_queries(str(root), "test", load_corpus(str(root)))
    assert q.qrels == {"q1": {"d1": 1}, "q2": {"d3": 2, "d2": 1}}


def test_scifact_style_ascii_escaped_and_integer_ids(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", ['{"_id": 7, "title": "\\u00e9t\\u00e9", "text": "x", "metadata": {}}'])
    corpus = load_corpus("", corpus_file=str(path))
    assert corpus.ids == ["7"] and corpus.texts == ["\u00e9t\u00e9 x"]


def test_plain_jsonl_files_with_and_without_labels(tmp_path):
    corpus_file = write_lines(tmp_path / "c.jsonl", [json.dumps(d) for d in CORPUS])
    queries_file = write_lines(tmp_path / "q.jsonl", [json.dumps(q) for q in QUERIES])
    qrels_file = write_lines(tmp_path / "qrels.tsv", ["q2\td2\t1"])  # no header is fine too
    corpus = load_corpus("", corpus_file=str(corpus_file))
    assert corpus.source == str(corpus_file)
    # Unlabelled training queries: every query of the file, empty labels.
    train = load_queries("", "train", corpus, queries_file=str(queries_file), require_labels=False)
    assert train.ids == ["q1", "q2", "q3"] and train.qrels == {"q1": {}, "q2": {}, "q3": {}}
    assert not train.labelled
    # With a qrels file, the queries it lists.
    some = load_queries("", "train", corpus, queries_file=str(queries_file), qrels_file=str(qrels_file),
                        require_labels=False)
    assert some.ids == ["q2"] and some.qrels == {"q2": {"d2": 1}} and some.labelled
    with pytest.raises(InputError, match="qrels"):
        load_queries("", "test", corpus, queries_file=str(queries_file))


def test_unlabelled_training_queries_of_a_beir_folder(tmp_path):
    root = small_beir(tmp_path)
    corpus = load_corpus(str(root))
    # A split the folder lacks is refused even without labels: "every query" would include the test split.
    with pytest.raises(InputError, match="'unlabelled' does not exist; available: test, train"):
        load_queries(str(root), "unlabelled", corpus, require_labels=False)
    # A queries file you name is trained on in full (the folder's qrels do not cover it) ...
    other = write_lines(tmp_path / "other.jsonl", ['{"_id": "x", "text": "other query"}'])
    assert load_queries(str(root), "u", corpus, queries_file=str(other), require_labels=False).ids == ["x"]
    # ... and so is a folder with no qrels at all: there is no other split to leak.
    for tsv in (root / "qrels").iterdir():
        tsv.unlink()
    q = load_queries(str(root), "train", corpus, require_labels=False)
    assert q.ids == ["q1", "q2", "q3"] and all(v == {} for v in q.qrels.values())


def test_demo_dataset_name_resolves(tmp_path, monkeypatch):
    from rag_capg.retrieval import demo_corpus

    root = small_beir(tmp_path)
    monkeypatch.setattr(demo_corpus, "demo_dir", lambda name: root if name == "stdlib" else None)
    corpus = load_corpus("demo:stdlib")
    assert corpus.source == "demo:stdlib" and len(corpus) == 3
    assert load_queries("demo:stdlib", "test", corpus).ids == ["q1", "q2"]


# -------------------------------------------------------------------------------------- Hugging Face


def _hf_repo(root: Path) -> Path:
    """A tiny dataset repo in the mteb layout (parquet shards + README configs), loaded by path."""
    import datasets

    datasets.Dataset.from_dict({"_id": ["d1", "d2", "d3"], "title": ["Cats", "", None],
                                "text": ["cats purr", "dogs bark", "owls hoot"]}).to_parquet(
        _mk(root / "corpus" / "corpus-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"_id": ["q1", "q2", "q3"], "text": [q["text"] for q in QUERIES]}).to_parquet(
        _mk(root / "queries" / "queries-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"query-id": ["q1", "q2"], "corpus-id": ["d1", "d2"], "score": [1, 0]}).to_parquet(
        _mk(root / "default" / "test-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"query-id": ["q3"], "corpus-id": ["d3"], "score": [1]}).to_parquet(
        _mk(root / "default" / "train-00000-of-00001.parquet"))
    configs = [("corpus", [("corpus", "corpus/*.parquet")]), ("queries", [("queries", "queries/*.parquet")]),
               ("default", [("train", "default/train-*.parquet"), ("test", "default/test-*.parquet")])]
    yaml = "---\nconfigs:\n" + "".join(
        f"- config_name: {name}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {p}\n" for s, p in files)
        for name, files in configs) + "---\n"
    (root / "README.md").write_text(yaml)
    return root


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_hf_dataset_repo_layout(tmp_path, hf_cache):
    root = _hf_repo(tmp_path / "repo")
    corpus = load_corpus(str(root))
    assert corpus.ids == ["d1", "d2", "d3"] and corpus.texts == ["Cats cats purr", "dogs bark", "owls hoot"]
    test = load_queries(str(root), "test", corpus)
    assert test.ids == ["q1"] and test.qrels == {"q1": {"d1": 1}}  # grade 0 dropped
    assert load_queries(str(root), "train", corpus).qrels == {"q3": {"d3": 1}}
    with pytest.raises(InputError, match=r"split 'dev' does not exist; available: train, test"):
        load_queries(str(root), "dev", corpus)
    # The same data through the BEIR loader gives the same corpus fingerprint.
    assert corpus.fingerprint == load_corpus(str(small_beir(tmp_path))).fingerprint


def test_hf_save_to_disk_layouts(tmp_path, hf_cache):
    import datasets

    corpus_ds = datasets.Dataset.from_dict({"_id": ["d1", "d2"], "text": ["a", "b"]})
    queries_ds = datasets.Dataset.from_dict({"_id": ["q1"], "text": ["find a"]})
    qrels_ds = datasets.Dataset.from_dict({"query-id": ["q1"], "corpus-id": ["d1"], "score": [1]})
    apart = tmp_path / "apart"  # corpus/, queries/, qrels/ each saved with save_to_disk
    datasets.DatasetDict({"corpus": corpus_ds}).save_to_disk(str(apart / "corpus"))
    datasets.DatasetDict({"queries": queries_ds}).save_to_disk(str(apart / "queries"))
    datasets.DatasetDict({"test": qrels_ds}).save_to_disk(str(apart / "qrels"))
    whole = tmp_path / "whole"  # one DatasetDict with corpus, queries and qrels splits
    datasets.DatasetDict({"corpus": corpus_ds, "queries": queries_ds, "test": qrels_ds}).save_to_disk(str(whole))
    for root in (apart, whole):
        corpus = load_corpus(str(root))
        assert corpus.ids == ["d1", "d2"]
        assert load_queries(str(root), "test", corpus).qrels == {"q1": {"d1": 1}}


def test_hf_errors_name_the_config_and_row(tmp_path, hf_cache):
    import datasets

    root = tmp_path / "bad"
    datasets.DatasetDict({"corpus": datasets.Dataset.from_dict({"_id": ["d1", "d1"], "text": ["a", "b"]}),
                          "queries": datasets.Dataset.from_dict({"_id": ["q1"], "text": ["x"]}),
                          "test": datasets.Dataset.from_dict({"query-id": ["q1"], "corpus-id": ["nope"],
                                                              "score": [1]})}).save_to_disk(str(root))
    with pytest.raises(InputError) as exc:
        load_corpus(str(root))
    assert exc.value.line == 2 and exc.value.field == "_id" and "[corpus/corpus]" in str(exc.value)
    corpus = Corpus(ids=["d1"], texts=["a"])
    with pytest.raises(InputError) as exc:
        load_queries(str(root), "test", corpus)
    assert exc.value.line == 1 and exc.value.field == "corpus-id" and "'nope'" in str(exc.value)


def test_missing_hub_dataset_offline(hf_cache):
    with pytest.raises(InputError, match="cannot load"):
        load_corpus("no-such-owner/no-such-dataset")


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("lines, line, field, words", [
    (['{"_id": "d1", "text": "a"}', '{"_id": "d2", "text": "b"'], 2, "<json>", ["corrupt JSON"]),
    (['{"_id": "d1", "text": "a"}', '["d2", "b"]'], 2, "<json>", ["JSON object", "list"]),
    (['{"_id": "d1", "text": "a"}', '', '{"text": "b"}'], 3, "_id", ["missing"]),
    (['{"_id": "d1"}'], 1, "text", ["missing"]),
    (['{"_id": "d1", "text": 5}'], 1, "text", ["string", "int"]),
    (['{"_id": "d1", "text": "a", "title": ["x"]}'], 1, "title", ["string", "list"]),
    (['{"_id": ["d1"], "text": "a"}'], 1, "_id", ["string"]),
    (['{"_id": "d1", "text": "a"}', '{"_id": "d2", "text": "b"}', '{"_id": "d1", "text": "c"}'], 3, "_id",
     ["duplicate id 'd1'", "line 1", "line 3"]),
])
def test_corpus_line_errors(tmp_path, lines, line, field, words):
    root = small_beir(tmp_path)
    write_lines(root / "corpus.jsonl", lines)
    with pytest.raises(InputError) as exc:
        load_corpus(str(root))
    assert_error(exc, root / "corpus.jsonl", line, field, *words)


def test_query_line_errors(tmp_path):
    root = small_beir(tmp_path)
    corpus = load_corpus(str(root))
    write_lines(root / "queries.jsonl", ['{"_id": "q1", "text": "a"}', '{"_id": "q1", "text": "b"}'])
    with pytest.raises(InputError) as exc:
        load_queries(str(root), "test", corpus)
    assert_error(exc, root / "queries.jsonl", 2, "_id", "duplicate id 'q1'", "line 1")


@pytest.mark.parametrize("rows, line, field, words", [
    (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q9\td1\t1"], 3, "query-id", ["unknown query id 'q9'"]),
    (["query-id\tcorpus-id\tscore", "q1\td9\t1"], 2, "corpus-id", ["unknown passage id 'd9'"]),
    (["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2"], 3, "score", ["3 tab-separated columns", "got 2"]),
    (["query-id\tcorpus-id\tscore", "q1\td1\thigh"], 2, "score", ["integer", "'high'"]),
])
def test_qrels_errors(tmp_path, rows, line, field, words):
    root = small_beir(tmp_path)
    corpus = load_corpus(str(root))
    write_lines(root / "qrels" / "test.tsv", rows, newline="\r\n")
    with pytest.raises(InputError) as exc:
        load_queries(str(root), "test", corpus)
    assert_error(exc, root / "qrels" / "test.tsv", line, field, *words)


def test_split_without_positive_labels(tmp_path):
    root = small_beir(tmp_path, qrels={"test": [("q1", "d1", 0)]})
    with pytest.raises(InputError, match="no query with a relevant passage") as exc:
        load_queries(str(root), "test", load_corpus(str(root)))
    assert_error(exc, root / "qrels" / "test.tsv", None, "score")


def test_empty_corpus(tmp_path):
    root = small_beir(tmp_path)
    write_lines(root / "corpus.jsonl", ["", "  "])
    with pytest.raises(InputError, match="empty corpus") as exc:
        load_corpus(str(root))
    assert str(root / "corpus.jsonl") in str(exc.value)


def test_missing_split_lists_available(tmp_path):
    root = small_beir(tmp_path)
    with pytest.raises(InputError) as exc:
        load_queries(str(root), "dev", load_corpus(str(root)))
    assert_error(exc, root / "qrels", None, "split", "split 'dev' does not exist", "available: test, train")


def test_missing_paths(tmp_path):
    with pytest.raises(InputError, match="dataset path does not exist") as exc:
        load_corpus(str(tmp_path / "no" / "such" / "dir"))
    assert str(tmp_path / "no" / "such" / "dir") in str(exc.value)
    with pytest.raises(InputError, match="file does not exist"):
        load_corpus("", corpus_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="unknown demo"):
        load_corpus("demo:nope")


def test_check_candidate_size():
    corpus = Corpus(ids=["a", "b", "c"], texts=["x", "y", "z"])
    check_candidate_size(3, corpus)
    with pytest.raises(InputError, match="4 candidates.*only 3 passages") as exc:
        check_candidate_size(4, corpus)
    assert exc.value.field == "num_candidates"
    with pytest.raises(InputError):
        check_candidate_size(0, corpus)


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive():
    ids, texts = ["a", "b"], ["x y", "z"]
    fp = corpus_fingerprint(ids, texts)
    # Independent reimplementation of the documented recipe: sha256 over JSON [id, text] lines, 16 hex.
    expected = hashlib.sha256(b'["a", "x y"]\n["b", "z"]\n').hexdigest()[:16]
    assert fp == expected == Corpus(ids=list(ids), texts=list(texts)).fingerprint
    assert len(fp) == 16
    variants = [(["a", "b"], ["x y", "z "]), (["a", "c"], ["x y", "z"]), (["b", "a"], ["z", "x y"]),
                (["a", "b"], ["x", "y z"]), (["a"], ["x y"])]
    fps = {corpus_fingerprint(i, t) for i, t in variants}
    assert fp not in fps and len(fps) == len(variants)


def test_corpus_and_queryset_invariants():
    with pytest.raises(ValueError):
        Corpus(ids=["a", "a"], texts=["x", "y"])
    with pytest.raises(ValueError):
        Corpus(ids=["a"], texts=["x", "y"])
    qs = QuerySet(ids=["q"], texts=["t"], qrels={"q": {}}, split="train")
    assert len(qs) == 1 and not qs.labelled
