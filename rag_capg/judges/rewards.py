"""From judge scores to training signal: the LSR's picks from a candidate list and non-negative rewards."""

from __future__ import annotations

from typing import Literal

import torch

from rag_capg.pg.policy import sample_plackett_luce

PickPolicy = Literal["top", "sample"]
RewardMapping = Literal["identity", "clip", "sigmoid"]


def pick(scores: torch.Tensor, num_picks: int, *, policy: PickPolicy = "top", temperature: float = 1.0,
         generator: torch.Generator | None = None) -> torch.LongTensor:
    """(B, L) positions into the candidate list chosen by the LSR.

    "top": the L best scores, best first. "sample": L draws without replacement from the
    Plackett-Luce model with logits scores / temperature (Gumbel top-k: the L largest of
    scores / T + Gumbel noise), so a low temperature approaches "top" and a high one uniform.
    """
    b, k = scores.shape
    if not 0 < num_picks <= k:
        raise ValueError(f"pick: num_picks={num_picks} must be in [1, {k}] (candidates per query)")
    if not torch.isfinite(scores).all():
        raise ValueError("pick: scores contain NaN/inf (drop skipped queries first)")
    if policy == "top":
        return scores.topk(num_picks, dim=1).indices
    if policy != "sample":
        raise ValueError(f"pick: policy must be 'top' or 'sample', got {policy!r}")
    if temperature <= 0:
        raise ValueError(f"pick: temperature must be > 0, got {temperature}")
    return sample_plackett_luce(scores / temperature, num_picks, generator=generator)


def to_reward(scores: torch.Tensor, mapping: RewardMapping = "identity") -> torch.Tensor:
    """Non-negative rewards from judge scores (the CA-PG estimators require r >= 0).

    "identity": the score itself (probabilities, grades); a negative score is an error, since a
    raw logit or a cosine would otherwise be silently mis-credited. "clip": max(0, s).
    "sigmoid": sigmoid(s), for judges returning logits. NaN/inf is always an error.
    """
    if not torch.isfinite(scores).all():
        raise ValueError("to_reward: scores contain NaN/inf (a skipped query must be dropped, not rewarded 0)")
    if mapping == "identity":
        if (scores < 0).any():
            raise ValueError(f"to_reward: mapping 'identity' needs scores >= 0, got min {scores.min().item():.4g}; "
                             "use reward_mapping 'clip' or 'sigmoid' for judges with signed scores")
        return scores
    if mapping == "clip":
        return scores.clamp_min(0.0)
    if mapping == "sigmoid":
        return torch.sigmoid(scores)
    raise ValueError(f"to_reward: mapping must be 'identity', 'clip' or 'sigmoid', got {mapping!r}")
