"""What a training step logs: (sum, count) pairs per quantity, summed over micro-batches and processes in one
all-reduce, then turned into the row of metrics.jsonl (the mean of each is sum / count)."""

from __future__ import annotations

import math

import torch

from rag_capg.pg.policy import entropy
from rag_capg.training.rollout import Rollout, candidate_recall

SUMMED = ("loss", "kl", "reward", "reward_sq", "zero_var", "zero_reward", "candidate_recall", "entropy",
          "skipped_queries", "lsr_hits", "lsr_misses")


def step_sums(ro: Rollout, query_idx: list[int], queries, corpus_ids: list[str], *, logits: torch.Tensor,
              loss: torch.Tensor, kl: torch.Tensor, group_size: int, num_picks: int) -> dict[str, torch.Tensor]:
    """(sum, count) per logged quantity of one micro-batch, as float64 tensors on the logits' device: no host
    sync until the one reduce per step (the judge's rewards live on the host: copying them to the device
    does not wait). The judge's cache lookups are added by the caller."""
    B, G, L = len(query_idx), group_size, num_picks
    dev = logits.device
    kept = ro.raw_rewards.view(B, G, L)[ro.kept]  # (B', G, L): the queries the judge did not fail on
    flat = kept.flatten(1)
    n_kept = float(kept.shape[0])

    def pair(total, count) -> torch.Tensor:
        return torch.stack([torch.as_tensor(total, dtype=torch.float64).to(dev),
                            torch.tensor(float(count), dtype=torch.float64, device=dev)])

    return {"loss": pair(loss.detach().double() * B, B), "kl": pair(kl.detach().double().sum(), B),
            "reward": pair(kept.double().sum(), kept.numel()),
            "reward_sq": pair((kept.double() ** 2).sum(), kept.numel()),
            # a group whose rewards are all equal teaches nothing relative: its share is logged
            "zero_var": pair((flat.std(dim=1, correction=0) == 0).sum() if flat.shape[1] > 1 else 0, n_kept),
            "zero_reward": pair((flat.amax(dim=1) == 0).sum() if n_kept else 0, n_kept),
            "candidate_recall": pair(*candidate_recall(ro, query_idx, queries, corpus_ids)),
            "entropy": pair(entropy(logits.detach()).double().sum(), B),
            "skipped_queries": pair((~ro.kept).sum(), 1)}


def step_row(total: list[float], *, args) -> dict:
    """The metrics.jsonl row of a step from the all-reduced sums (``total``: SUMMED's pairs, flattened)."""
    m = {k: (total[2 * i], total[2 * i + 1]) for i, k in enumerate(SUMMED)}

    def mean(k):
        return m[k][0] / m[k][1] if m[k][1] else None

    reward = mean("reward") or 0.0
    hits, misses = m["lsr_hits"][0], m["lsr_misses"][0]
    return {"loss": mean("loss"), "reward_mean": reward,
            "reward_std": math.sqrt(max((mean("reward_sq") or 0.0) - reward ** 2, 0)),
            # a group of one reward (G * L = 1) has no variance to speak of: not logged then
            "zero_var_frac": mean("zero_var") if args.group_size * args.num_picks > 1 else None,
            "candidate_recall": mean("candidate_recall"), "entropy": mean("entropy"),
            **({"kl": mean("kl")} if args.beta > 0 else {}),
            "skipped_queries": int(m["skipped_queries"][0]), "zero_reward_frac": mean("zero_reward") or 0.0,
            "lsr_hit_rate": hits / max(hits + misses, 1), "lsr_misses": int(misses)}
