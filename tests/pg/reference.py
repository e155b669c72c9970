"""Brute-force references shared by the policy-gradient tests: straight from the definitions, no tricks."""

from __future__ import annotations

import torch


def naive_pl_prob(logits, ordered_list: tuple[int, ...]) -> torch.Tensor:
    """pi(S) = prod_k w_{c_k} / sum_{j not yet drawn} w_j for 1-D logits (a list of floats, taken as float64, or
    a tensor, differentiable through autograd)."""
    s = logits if isinstance(logits, torch.Tensor) else torch.tensor(logits, dtype=torch.float64)
    w = s.exp()
    remaining = list(range(s.shape[0]))
    prob = torch.ones((), dtype=s.dtype)
    for c in ordered_list:
        prob = prob * w[c] / w[remaining].sum()
        remaining.remove(c)
    return prob
