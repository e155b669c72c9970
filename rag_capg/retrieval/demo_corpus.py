"""The README's demo dataset: code search over the installed Python standard library.

Every machine that runs rag-capg has a Python standard library, so the project can build a real retrieval
task from it without shipping third-party data. Each documented public function or method becomes:

- a passage: its source code with the docstring removed (signature kept, capped at ``max_chars``), titled
  with its dotted name (``json.decoder.JSONDecoder.decode``), as a code-search index would show it;
- a query: the docstring's summary (first sentence of the first paragraph);
- a qrel: the query's own function, grade 1.

Two splits of the queries (the corpus always holds every passage):

- ``demo:stdlib``: by function, at random (a hash of the function's name): no test query's function is
  trained on, but its module's other functions may be - a code base's own search, where the queries to come
  are about the same code as the labelled ones;
- ``demo:stdlib-packages``: by top-level package, so that test queries come from packages the policy never saw
  a query for (vocabulary included): transfer to unseen code, which a query tower alone barely learns
  (eval/RESULTS.md, "Cross-collection benchmark").

The dataset depends only on the interpreter's stdlib, so it is cached per Python version as a BEIR folder
(written atomically) and ``load_corpus("demo:stdlib")`` reuses it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
import textwrap
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from rag_capg.errors import InputError
from rag_capg.io import atomic_dir


@dataclass(frozen=True)
class DemoOptions:
    max_passages: int = field(default=3000, metadata={"help": "Corpus size cap (deterministic subsample)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of queries that are test."})
    split_by: Literal["function", "package"] = field(default="function", metadata={"help": (
        "Unit that goes to train or test as a whole: a function (at random) or a top-level package.")})
    max_chars: int = field(default=1000, metadata={"help": "Passage length cap, cut at a line boundary."})
    min_summary_words: int = field(default=4, metadata={"help": "Shorter docstring summaries are skipped."})
    max_per_module: int = field(default=50, metadata={"help": "Cap per module, so that tkinter's hundreds of "
                                                               "one-line Tcl wrappers do not dominate."})


# Directories that are tests, demos, vendored wheels or generated data, not library code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "turtledemo", "pydoc_data",
              "__pycache__", "_bundled", "lib2to3", "idlelib", "ensurepip"}
_ABBREVIATIONS = {"e.g", "i.e", "etc", "cf", "vs", "resp", "approx", "no", "mr", "dr"}
_SIGNATURE_SUMMARY = re.compile(r"^[\w.]+\(.*\)\s*(->|$)")  # "S.find(sub[, start]) -> int" style summaries


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit_hash(text: str) -> float:
    """A stable hash in [0, 1) (Python's hash() is salted per process, so it would not be deterministic)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def package_of(module: str) -> str:
    return module.split(".")[0]


def assign_splits(modules: list[str], test_fraction: float) -> dict[str, str]:
    """module -> "train" | "test", by top-level package, so that `email.parser` and `email.message` (which
    share vocabulary) never straddle the split. Packages are visited in a fixed hash order and go to test
    until test holds ``test_fraction`` of the queries: a hash threshold alone would let one big package
    swing the test share by several points."""
    sizes: dict[str, int] = {}
    for m in modules:
        sizes[package_of(m)] = sizes.get(package_of(m), 0) + 1
    test, n_test = set(), 0
    for pkg in sorted(sizes, key=_unit_hash):
        if n_test >= test_fraction * len(modules):
            break
        test.add(pkg)
        n_test += sizes[pkg]
    return {m: "test" if package_of(m) in test else "train" for m in set(modules)}


def summary_of(docstring: str) -> str:
    """First sentence of the docstring's first paragraph, on one line, without the final period."""
    paragraph = docstring.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    # A sentence ends at a period followed by the end or by a capitalised word, unless it closes an
    # abbreviation ("e.g. Foo", "i.e. X", "etc. And").
    for match in re.finditer(r"\.(?=\s+[A-Z`'\"(]|\s*$)", text):
        words = text[: match.start()].split()
        if words and words[-1].lower() in _ABBREVIATIONS:
            continue
        text = text[: match.start()]
        break
    text = text.strip().rstrip(".:")
    return re.sub(r",?\s*\b(e\.g|i\.e)$", "", text)  # "... Message-ID, e.g.:" followed by an example


def _is_trivial(body: list[ast.stmt]) -> bool:
    """A body with nothing to retrieve: `pass`, `...`, or `raise NotImplementedError` alone."""
    if len(body) != 1:
        return not body
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def strip_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef, max_chars: int) -> str | None:
    """The function's source lines without its docstring statement, dedented and capped at ``max_chars``.

    Works on line numbers from the AST (one split per file, not one per function as
    ``ast.get_source_segment`` would do), which keeps the whole-stdlib build to a few seconds.
    Returns None when the docstring shares a line with other code (a one-liner), where lines cannot
    separate them.
    """
    doc = node.body[0]
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    # The docstring must own its lines: nothing before it on its first line (`def f(): """doc"""`) and
    # nothing but a comment after it on its last line (`"""doc"""; x = 1`). col offsets are UTF-8 bytes.
    before = lines[doc.lineno - 1].encode()[: doc.col_offset].decode(errors="ignore")
    after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset:].decode(errors="ignore").strip()
    if before.strip() or (after and not after.startswith("#")):
        return None
    header_end = doc.lineno - 1  # last line before the docstring
    kept = lines[start - 1: header_end] + lines[doc.end_lineno: node.end_lineno]
    source = textwrap.dedent("\n".join(kept)).strip("\n")
    if len(source) > max_chars:
        cut = source.rfind("\n", 0, max_chars)
        source = source[: cut if cut > 0 else max_chars]
    return source


def _functions(tree: ast.Module):
    """Module-level functions and methods of module-level (and nested) classes, with dotted qualnames.
    Functions nested in functions are part of their parent's passage, not entries of their own."""
    stack = [(tree, "")]
    while stack:
        parent, prefix = stack.pop()
        for node in ast.iter_child_nodes(parent):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                stack.append((node, f"{prefix}{node.name}."))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                yield f"{prefix}{node.name}", node


def extract_entries(path: Path, root: Path, options: DemoOptions) -> list[dict]:
    """(module, qualname, summary, code) for each documented public function of one file."""
    module = module_name(path, root)
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    # read_text already turned \r\n into \n; str.splitlines would also split on \f and \x1c, which the
    # tokenizer does not count as line ends, and shift every AST line number after them.
    lines = source.split("\n")
    entries = []
    for qualname, node in _functions(tree):
        docstring = ast.get_docstring(node)
        if not docstring or _is_trivial(node.body[1:]):
            continue
        summary = summary_of(docstring)
        n_words = len(summary.split())
        if n_words < options.min_summary_words or n_words > 60 or _SIGNATURE_SUMMARY.match(summary):
            continue
        code = strip_docstring(lines, node, options.max_chars)
        if code is None or summary in code:  # a query copied into the code would be a give-away
            continue
        entries.append({"module": module, "qualname": qualname, "summary": summary, "code": code})
    return entries


def build_demo(options: DemoOptions = DemoOptions(), root: Path | None = None) -> dict:
    """Build the dataset in memory: {"corpus": [...], "queries": [...], "qrels": {split: [(qid, pid, 1)]}}."""
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune while walking: site-packages alone can hold more files than the whole stdlib.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "_"))]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test")
                  and (not f.startswith("_") or f == "__init__.py")]
    files.sort(key=lambda p: p.relative_to(root).parts)
    entries = [e for p in files for e in extract_entries(p, root, options)]
    # Dedupe: a summary or a passage seen twice (overrides, copy-pasted helpers) would make the qrels
    # ambiguous, so only the first occurrence (sorted file order, then source order) is kept.
    # A name seen twice (a property's getter and setter, `if`-guarded alternatives) keeps its first one.
    seen_summaries, seen_code, seen_names, unique = set(), set(), set(), []
    for e in entries:
        key, name = e["summary"].lower(), (e["module"], e["qualname"])
        if key in seen_summaries or e["code"] in seen_code or name in seen_names:
            continue
        seen_summaries.add(key)
        seen_code.add(e["code"])
        seen_names.add(name)
        unique.append(e)
    # Per-module cap, then a global cap, both deterministic: entries are ordered by a hash of their name
    # and the first ones kept, i.e. a uniform random subset that is the same on every run and machine for
    # this Python version.
    unique = sorted(unique, key=lambda e: _unit_hash(f"{e['module']}:{e['qualname']}"))
    per_module: dict[str, int] = {}
    capped = []
    for e in unique:
        per_module[e["module"]] = per_module.get(e["module"], 0) + 1
        if per_module[e["module"]] <= options.max_per_module:
            capped.append(e)
    unique = sorted(capped[: options.max_passages], key=lambda e: (e["module"], e["qualname"]))
    pids = [f"{e['module']}:{e['qualname']}" for e in unique]
    if options.split_by == "package":
        side_of_module = assign_splits([e["module"] for e in unique], options.test_fraction)
        sides = [side_of_module[e["module"]] for e in unique]
    else:  # a fixed hash of the function's id: the same split on every machine with this Python
        sides = ["test" if _unit_hash(f"split:{pid}") < options.test_fraction else "train" for pid in pids]
    corpus, queries, qrels = [], [], {"train": [], "test": []}
    for e, pid, side in zip(unique, pids, sides):
        corpus.append({"_id": pid, "title": f"{e['module']}.{e['qualname']}", "text": e["code"]})
        queries.append({"_id": f"q:{pid}", "text": e["summary"], "module": e["module"]})
        qrels[side].append((f"q:{pid}", pid, 1))
    return {"corpus": corpus, "queries": queries, "qrels": qrels}


def write_beir(data: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in data["corpus"])
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in data["queries"])
    (folder / "qrels").mkdir(exist_ok=True)
    for split, rows in data["qrels"].items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def cache_root() -> Path:
    return Path(os.environ.get("RAG_CAPG_CACHE", Path.home() / ".cache" / "rag-capg")).expanduser()


DEMO_SPLITS = {"stdlib": "function", "stdlib-packages": "package"}


def demo_dir(name: str = "stdlib", *, options: DemoOptions = DemoOptions(), cache_dir: str | Path | None = None,
             rebuild: bool = False) -> Path:
    """Path of the demo's BEIR folder, built on first use and cached per (Python version, options)."""
    if name not in DEMO_SPLITS:
        raise InputError(f"unknown demo dataset 'demo:{name}'; available: "
                         f"{', '.join('demo:' + n for n in DEMO_SPLITS)}", field="dataset")
    options = replace(options, split_by=DEMO_SPLITS[name])
    key = json.dumps([platform.python_implementation(), sys.version, str(stdlib_root()), asdict(options)])
    tag = f"demo-{name}-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    folder = Path(cache_dir or cache_root()) / f"{tag}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    if rebuild or not (folder / "meta.json").is_file():
        data = build_demo(options)
        with atomic_dir(folder) as tmp:
            write_beir(data, tmp)
            counts = {"passages": len(data["corpus"]), **{f"{s}_queries": len(r) for s, r in data["qrels"].items()}}
            (tmp / "meta.json").write_text(json.dumps({"python": sys.version, "options": asdict(options),
                                                       "counts": counts}, indent=2) + "\n")
    return folder


if __name__ == "__main__":  # python -m rag_capg.retrieval.demo_corpus: build (or find) the cache and print the counts
    print(demo_dir(rebuild="--rebuild" in sys.argv))
    print((demo_dir() / "meta.json").read_text())
