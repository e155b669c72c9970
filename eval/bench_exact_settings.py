"""Accuracy against cost of CA-PG-exact's settings (quadrature nodes, top_m) on synthetic-benchmark logits.

CA-PG-exact's cost per pick is a quadrature of a truncated Poisson-binomial DP: about nodes x (top_m + 1) x K
multiply-adds forward and twice that for the adjoint, plus the tail's sums over the row. This prints, for
each setting, how far P(a in S_K) and the gradient of log P are from a reference with 128 nodes and the DP
over all N - 1 others (no tail term), and the time of log P forward + backward for a batch of 128 picks (the benchmark's
step: B = 128, L = 1, K = 20, N = 1,000).

Logits are those of the benchmark's two-tower ESR (10-dimensional, unit-variance embeddings) times a scale
(1 = at initialisation, 2 and 3 = sharper policies later in training); picks are the first, 6th and 20th
items of Gumbel top-K samples, where the LSR's picks come from.

    python eval/bench_exact_settings.py
    python eval/bench_exact_settings.py --settings 32:63 16:31 --scales 1 3
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from rag_capg.pg.inclusion import inclusion_prob_exact, log_inclusion_prob
from rag_capg.pg.policy import sample_plackett_luce


def grad_of_log_p(s: torch.Tensor, items: torch.Tensor, k: int, nodes: int, top_m: int | None) -> torch.Tensor:
    x = s.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_inclusion_prob(x, items, k, method="exact", num_nodes=nodes,
                                                     top_m=top_m).sum(), x)
    return grad


def time_forward_backward(s: torch.Tensor, items: torch.Tensor, k: int, nodes: int, top_m: int,
                          repeats: int) -> float:
    x = s.float().requires_grad_(True)
    log_inclusion_prob(x, items, k, method="exact", num_nodes=nodes, top_m=top_m).sum().backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        x.grad = None
        log_inclusion_prob(x, items, k, method="exact", num_nodes=nodes, top_m=top_m).sum().backward()
    return 1000 * (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["12:23", "16:23", "20:23", "12:31", "24:27", "32:63"],
                    help="nodes:top_m pairs (12:23 is the default of the estimator)")
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 2.0, 3.0])
    ap.add_argument("--rows", type=int, default=32, help="query rows in the accuracy check")
    ap.add_argument("--repeats", type=int, default=20, help="timed forward + backward passes per setting")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    N, K, B = 1000, 20, 128
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()} | torch {torch.__version__} | 1 thread | K={K}, N={N}; "
          f"timing: log P forward + backward for B={B} picks, float32 logits\n")
    g = torch.Generator().manual_seed(0)
    users, items_emb = torch.randn(max(args.rows, B), 10, generator=g), torch.randn(N, 10, generator=g)
    print("| logit scale | nodes | top_m | max abs error of P | max relative error of grad log P | ms (f+b) |")
    print("|---|---|---|---|---|---|")
    for scale in args.scales:
        s_all = (users @ items_emb.T * scale).double()
        s = s_all[:args.rows]
        picks = sample_plackett_luce(s, K, generator=g)[:, [0, 5, 19]]
        ref_p = inclusion_prob_exact(s, picks, K, num_nodes=128, top_m=None)
        ref_g = grad_of_log_p(s, picks, K, 128, None)
        timing_picks = sample_plackett_luce(s_all[:B], K, generator=g)[:, :1]
        for setting in args.settings:
            nodes, top_m = (int(v) for v in setting.split(":"))
            p = inclusion_prob_exact(s, picks, K, num_nodes=nodes, top_m=top_m)
            grad = grad_of_log_p(s, picks, K, nodes, top_m)
            rel = float(((grad - ref_g).norm(dim=1) / ref_g.norm(dim=1)).max())
            ms = time_forward_backward(s_all[:B], timing_picks, K, nodes, top_m, args.repeats)
            print(f"| {scale:g} | {nodes} | {top_m} | {float((p - ref_p).abs().max()):.1e} | {rel:.1e} | {ms:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
