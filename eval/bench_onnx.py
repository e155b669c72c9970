"""ONNX against torch for a folder written by `rag-capg export --onnx --onnx-quantize`.

For each engine - torch (SentenceTransformer), ONNX float32 and ONNX int8 (rag_capg.export.onnx.OnnxEncoder) -
the largest embedding difference from torch and the smallest cosine with it, on a split's queries (query
tower) and the corpus (document tower); the time to encode the first N queries (engines interleaved, each
repeat in the same order, median and min reported); and first-stage nDCG@10 / Recall@20 over the corpus,
so that the int8 copy's loss is measured where it matters.

    python eval/bench_onnx.py models/scifact-onnx --dataset /work/shared/data/scifact --split test --threads 2
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="an exported folder with onnx/model.onnx and onnx/model_qint8_quantized.onnx")
    parser.add_argument("--dataset", required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--queries", type=int, default=256, help="how many queries are timed")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-retrieval", action="store_true", help="skip encoding the corpus")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from rag_capg.evaluation.metrics import evaluate_run
    from rag_capg.export.onnx import INT8_NAME, ONNX_NAME, OnnxEncoder
    from rag_capg.export.onnx_export import cpu_name
    from rag_capg.retrieval.data import load_dataset_splits

    torch.set_num_threads(args.threads)
    corpus, splits = load_dataset_splits(args.dataset, [args.split])
    queries = splits[args.split]
    engines = {"torch": SentenceTransformer(args.folder, device="cpu"),
               "onnx float32": OnnxEncoder(args.folder, ONNX_NAME, num_threads=args.threads),
               "onnx int8": OnnxEncoder(args.folder, INT8_NAME, num_threads=args.threads)}
    timed = queries.texts[:args.queries]
    for engine in engines.values():  # warm-up: first-call allocations, lazy imports
        engine.encode_query(timed[:args.batch_size], batch_size=args.batch_size)
    seconds = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.encode_query(timed, batch_size=args.batch_size)
            seconds[name].append(time.perf_counter() - start)

    print(f"# {args.folder} on {args.dataset} ({args.split}: {len(queries)} queries, {len(corpus)} passages); "
          f"{cpu_name()}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the end of the timing")
    header = "| engine | max abs diff (queries / passages) | min cosine (queries / passages) | " \
             f"{len(timed)} queries, median (min) of {args.repeats} | speed-up |"
    if not args.no_retrieval:
        header += " nDCG@10 | Recall@20 |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    reference = None
    for name, engine in engines.items():
        q = engine.encode_query(queries.texts, batch_size=args.batch_size)
        d = engine.encode_document(corpus.texts, batch_size=args.batch_size) if not args.no_retrieval else None
        if reference is None:
            reference = (q, d)

        def gaps(a, b):
            if a is None:
                return float("nan"), float("nan")
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            return float(np.abs(a - b).max()), float(cos.min())

        (gq, cq), (gd, cd) = gaps(q, reference[0]), gaps(d, reference[1])
        median = float(np.median(seconds[name]))
        row = (f"| {name} | {gq:.1e} / {gd:.1e} | {cq:.4f} / {cd:.4f} | {median:.2f} s ({min(seconds[name]):.2f} s) "
               f"| {np.median(seconds['torch']) / median:.2f}x |")
        if d is not None:
            qn, dn = q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)
            scores = qn @ dn.T
            top = np.argsort(-scores, axis=1)[:, :100]
            run = {qid: {corpus.ids[j]: float(scores[i, j]) for j in top[i]} for i, qid in enumerate(queries.ids)}
            metrics = evaluate_run(run, queries.qrels, ["ndcg@10", "recall@20"])
            row += f" {metrics['ndcg@10']:.4f} | {metrics['recall@20']:.4f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
