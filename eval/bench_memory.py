"""Memory of the two GPU-heavy pieces of a step, measured on CPU (no GPU needed; each case in its own process):

  chunks   both_towers re-encodes the passages a step touches with gradient (retriever.embed_with_grad):
           U passages of 256 tokens through a MiniLM-shaped random BERT (6 x 384), all at once
           (grad_chunk_size unset) or in checkpointed chunks
  exact    capg_exact's torch path (the GPU path, forced with RAG_CAPG_NO_NUMBA=1) at B*G rows over N
           passages, with and without its row chunks

Reported per case: MiB that autograd keeps for backward after the forward (saved-tensor hooks), the
process's peak RSS (ru_maxrss, which includes ~0.6 GiB of imports) and the forward + backward seconds (exact:
after one warm-up call; chunks: the first call).

    python eval/bench_memory.py chunks [--passages 128] [--chunks 0 16 64]
    python eval/bench_memory.py exact [--rows 128] [--n 5183 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time


def saved_mib(fn):
    """(result of fn(), MiB kept for backward by the autograd graph fn() builds)."""
    import torch

    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0] / 2**20


def case_chunks(passages: int, chunk: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from rag_capg.retrieval.retriever import embed_with_grad

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(1000)]]
    vocab = {t: i for i, t in enumerate(words)}
    folder = f"/tmp/bench_memory_bert_{os.getpid()}"
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536)).save_pretrained(folder)
    BertTokenizerFast(vocab=vocab).save_pretrained(folder)
    transformer = Transformer(folder, max_seq_length=256)
    model = SentenceTransformer(modules=[transformer, Pooling(384, "mean")], device="cpu").eval()
    texts = [" ".join(f"w{(i * 31 + j) % 1000}" for j in range(300)) for i in range(passages)]  # 256 tokens each
    t = time.perf_counter()
    emb, mib = saved_mib(lambda: embed_with_grad(model, texts, route="document", chunk_size=chunk or None))
    emb.pow(2).sum().backward()
    seconds = time.perf_counter() - t
    shutil.rmtree(folder, ignore_errors=True)
    return {"saved_mib": mib, "seconds": seconds}


def case_exact(rows: int, n: int, chunked: bool) -> dict:
    os.environ["RAG_CAPG_NO_NUMBA"] = "1"
    import torch

    from rag_capg.pg import inclusion

    if not chunked:
        inclusion._EXACT_TORCH_MAX_ELEMENTS = 2 ** 62
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(rows, 10, generator=g) @ torch.randn(n, 10, generator=g).T).double().requires_grad_(True)
    items = torch.randint(0, n, (rows, 1), generator=g)
    inclusion.log_inclusion_prob(s, items, 20, method="exact", num_nodes=12, top_m=23).sum().backward()  # warm-up
    t = time.perf_counter()
    lp, mib = saved_mib(lambda: inclusion.log_inclusion_prob(s, items, 20, method="exact", num_nodes=12, top_m=23))
    lp.sum().backward()
    return {"saved_mib": mib, "seconds": time.perf_counter() - t}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":  # one case, in this process
        kind, *values = sys.argv[2:]
        out = case_chunks(int(values[0]), int(values[1])) if kind == "chunks" else \
            case_exact(int(values[0]), int(values[1]), values[2] == "1")
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["chunks", "exact"])
    ap.add_argument("--passages", type=int, default=128)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 64])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--n", type=int, nargs="+", default=[5183, 40000])
    args = ap.parse_args()
    cases = [("chunks", str(args.passages), str(c)) for c in args.chunks] if args.what == "chunks" else \
        [("exact", str(args.rows), str(n), chunked) for n in args.n for chunked in ("0", "1")]
    for case in cases:
        res = json.loads(subprocess.run([sys.executable, __file__, "--case", *case], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
        if case[0] == "chunks":
            label = f"{case[1]} passages x 256 tokens, grad_chunk_size={case[2] if case[2] != '0' else 'unset'}"
        else:
            label = f"{case[1]} rows, N={case[2]}, row chunks {'on' if case[3] == '1' else 'off'}"
        print(f"{label:<55} saved for backward {res['saved_mib']:9.1f} MiB   peak RSS {res['peak_rss_mib']:8.0f} MiB"
              f"   {res['seconds']:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
