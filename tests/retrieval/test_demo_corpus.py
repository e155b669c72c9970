"""The stdlib code-search demo: built from the running interpreter, deterministic, leak-free, split by function
or by package."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

from rag_capg.retrieval import demo_corpus
from rag_capg.retrieval.data import load_corpus, load_queries
from rag_capg.retrieval.demo_corpus import DemoOptions, build_demo, demo_dir, extract_entries, summary_of


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return demo_dir(cache_dir=tmp_path_factory.mktemp("demo_cache"))


def test_built_folder_loads_and_counts(demo_folder):
    meta = json.loads((demo_folder / "meta.json").read_text())
    corpus = load_corpus(str(demo_folder))
    train = load_queries(str(demo_folder), "train", corpus)
    test = load_queries(str(demo_folder), "test", corpus)
    assert meta["counts"] == {"passages": len(corpus), "train_queries": len(train), "test_queries": len(test)}
    assert 1000 <= len(corpus) <= DemoOptions().max_passages
    # every passage is some query's answer; queries split ~80/20
    assert len(train) + len(test) == len(corpus)
    assert 0.1 <= len(test) / len(corpus) <= 0.3
    # each query's only relevant passage is its own function, and it is in the corpus
    for qs in (train, test):
        for qid in qs.ids:
            assert qs.qrels[qid] == {qid.removeprefix("q:"): 1}
            assert qid.removeprefix("q:") in corpus.index_of
    # no leftover temporary folders from the atomic write
    assert [p.name for p in demo_folder.parent.iterdir() if p.name.startswith(".")] == []


def test_deterministic_across_builds(demo_folder):
    again = build_demo()  # a second, independent build in memory
    assert again["corpus"] == read_jsonl(demo_folder / "corpus.jsonl")
    assert again["queries"] == read_jsonl(demo_folder / "queries.jsonl")
    for split in ("train", "test"):
        rows = (demo_folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        assert [tuple(r.split("\t")) for r in rows] == [(q, d, str(s)) for q, d, s in again["qrels"][split]]


def _split_modules(folder: Path) -> dict[str, set[str]]:
    module_of = {q["_id"]: q["module"] for q in read_jsonl(folder / "queries.jsonl")}
    splits = {}
    for split in ("train", "test"):
        rows = (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        splits[split] = {module_of[r.split("\t")[0]] for r in rows}
    return splits


def test_demo_stdlib_splits_functions_at_random(demo_folder):
    splits = _split_modules(demo_folder)
    # functions, not modules, go to one side: most modules have queries on both sides
    assert len(splits["train"] & splits["test"]) > 0.5 * len(splits["test"])
    train = set((demo_folder / "qrels" / "train.tsv").read_text().splitlines()[1:])
    test = set((demo_folder / "qrels" / "test.tsv").read_text().splitlines()[1:])
    assert train and test and not train & test


def test_demo_stdlib_packages_holds_whole_packages_out(tmp_path):
    folder = demo_dir("stdlib-packages", cache_dir=tmp_path)
    splits = _split_modules(folder)
    assert splits["train"] and splits["test"]
    assert not splits["train"] & splits["test"]
    top = {s: {m.split(".")[0] for m in ms} for s, ms in splits.items()}  # whole packages stay together
    assert not top["train"] & top["test"]
    # the same passages as demo:stdlib, only the queries' sides differ (one corpus-embedding cache serves both)
    assert (folder / "corpus.jsonl").read_text() == (demo_dir(cache_dir=tmp_path) / "corpus.jsonl").read_text()


def test_no_docstring_text_in_passages(demo_folder):
    """Independent check against the original source: re-parse each sampled module, find the function by its
    qualified name, and assert that no substantial line of its docstring survives in the passage."""
    corpus = read_jsonl(demo_folder / "corpus.jsonl")
    queries = {q["_id"]: q for q in read_jsonl(demo_folder / "queries.jsonl")}
    root = demo_corpus.stdlib_root()

    def source_file(module: str) -> Path:
        path = root / (module.replace(".", "/") + ".py")
        return path if path.exists() else root / module.replace(".", "/") / "__init__.py"

    for doc in corpus:  # the cheap check on every passage
        assert queries[f"q:{doc['_id']}"]["text"] not in doc["text"]
    # the thorough one on every passage of ~40 modules small enough to re-parse quickly
    modules = sorted({d["_id"].split(":")[0] for d in corpus})[::5]
    modules = [m for m in modules if source_file(m).stat().st_size < 60_000][:40]
    sample = [d for d in corpus if d["_id"].split(":")[0] in modules]
    checked = parsed_ok = 0
    trees: dict[str, ast.Module] = {}
    for doc in sample:
        module, qualname = doc["_id"].split(":")
        if module not in trees:
            trees[module] = ast.parse(source_file(module).read_text(encoding="utf-8"))
        tree = trees[module]
        node = tree
        for name in qualname.split("."):
            node = next(n for n in node.body if getattr(n, "name", None) == name)
        docstring = ast.get_docstring(node, clean=False)
        for line in docstring.splitlines():
            if len(line.strip()) >= 20:
                assert line.strip() not in doc["text"], (doc["_id"], line)
        assert doc["text"].lstrip().startswith(("def ", "async def ", "@"))  # the signature is kept
        try:
            fn = ast.parse(doc["text"]).body[0]
        except SyntaxError:  # truncated at max_chars
            assert len(doc["text"]) <= DemoOptions().max_chars
            continue
        parsed_ok += 1
        assert ast.get_docstring(fn) is None
        checked += 1
    assert checked > 50 and parsed_ok >= 0.7 * len(sample)


def test_load_corpus_reuses_the_cache(demo_folder, monkeypatch):
    monkeypatch.setenv("RAG_CAPG_CACHE", str(demo_folder.parent))
    monkeypatch.setattr(demo_corpus, "build_demo", lambda *a, **k: pytest.fail("cache not reused"))
    corpus = load_corpus("demo:stdlib")
    assert corpus.source == "demo:stdlib"
    assert corpus.ids == [d["_id"] for d in read_jsonl(demo_folder / "corpus.jsonl")]
    assert load_queries("demo:stdlib", "test", corpus).split == "test"


# ----------------------------------------------------------------------- extraction rules on a tiny tree


FAKE_MODULE = '''
"""Module docstring."""


def public(a, b=1):
    """Add two numbers together and return the sum.

    A longer description that must not be in the passage.
    """
    c = a + b
    return c

\x0c
@staticmethod
def decorated(x):
    """Compute the square of a number quickly."""
    return x * x


def _private(x):
    """This private helper function is skipped entirely."""
    return x


def short(x):
    """Too short."""
    return x


def oneliner(x): """Docstring on the def line is skipped."""; return x


def abstract(self):
    """Subclasses must implement this method properly."""
    raise NotImplementedError


class Widget:
    def draw(self, canvas):
        """Draw the widget on the given canvas, e.g. a screen.

        More details.
        """
        def inner():
            """Nested helpers stay inside their parent's passage."""
            return canvas
        return inner()
'''


def fake_stdlib(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "mod.py").write_text(FAKE_MODULE)
    (root / "pkg" / "__init__.py").write_text(FAKE_MODULE.replace("Add two", "Sum two").replace(
        "square of", "cube of").replace("Draw the", "Paint the").replace("c = a + b", "c = b + a").replace(
        "x * x", "x ** 3").replace("return inner()", "return inner() or 1"))
    (root / "test").mkdir()
    (root / "test" / "test_mod.py").write_text(FAKE_MODULE)
    (root / "_private_mod.py").write_text(FAKE_MODULE)
    return root


def test_extraction_rules(tmp_path):
    root = fake_stdlib(tmp_path)
    entries = extract_entries(root / "mod.py", root, DemoOptions())
    assert [e["qualname"] for e in entries] == ["public", "decorated", "Widget.draw"]
    by_name = {e["qualname"]: e for e in entries}
    assert by_name["public"]["summary"] == "Add two numbers together and return the sum"
    assert by_name["public"]["code"] == "def public(a, b=1):\n    c = a + b\n    return c"
    assert by_name["decorated"]["code"] == "@staticmethod\ndef decorated(x):\n    return x * x"
    assert by_name["Widget.draw"]["summary"] == "Draw the widget on the given canvas, e.g. a screen"
    assert by_name["Widget.draw"]["code"].startswith("def draw(self, canvas):\n    def inner():")
    assert "More details" not in by_name["Widget.draw"]["code"]


def test_build_on_fake_stdlib_dedupes_caps_and_skips(tmp_path):
    root = fake_stdlib(tmp_path)
    data = build_demo(DemoOptions(), root=root)
    ids = [d["_id"] for d in data["corpus"]]
    assert sorted(ids) == sorted(["mod:public", "mod:decorated", "mod:Widget.draw",
                                  "pkg:public", "pkg:decorated", "pkg:Widget.draw"])  # no test_, no _private
    # duplicates of summary or passage are dropped: a copy of mod.py adds nothing
    (root / "copy.py").write_text(FAKE_MODULE)
    assert len(build_demo(DemoOptions(), root=root)["corpus"]) == 6
    # caps: deterministic subsets
    small = build_demo(DemoOptions(max_passages=4), root=root)
    assert len(small["corpus"]) == 4 and small == build_demo(DemoOptions(max_passages=4), root=root)
    assert len(build_demo(DemoOptions(max_per_module=1), root=root)["corpus"]) == 2
    # test_fraction=1 sends every package to test, 0 sends every package to train
    assert len(build_demo(DemoOptions(test_fraction=1.0), root=root)["qrels"]["train"]) == 0
    assert len(build_demo(DemoOptions(test_fraction=0.0), root=root)["qrels"]["test"]) == 0


@pytest.mark.parametrize("docstring, summary", [
    ("Return the x.  More text.", "Return the x"),
    ("Split a path, e.g. foo/bar, in two. Then more.", "Split a path, e.g. foo/bar, in two"),
    ("Return a Message-ID, e.g.:\n\n<1.2@host>", "Return a Message-ID"),
    ("  First line\n  continues here.\n\n  Second paragraph.", "First line continues here"),
    (textwrap.dedent("""Build the thing:

        details"""), "Build the thing"),
])
def test_summary_of(docstring, summary):
    assert summary_of(docstring) == summary
