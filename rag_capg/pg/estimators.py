"""Policy-gradient estimators for the early-stage ranker, written as surrogate losses on logits.

Objective: V(theta) = E_x E_{S ~ pi_theta(.|x)} E_{a_1..a_L ~ LSR(S)} [ mean_l r(x, a_l) ].
Each estimator is a surrogate whose gradient is the estimate; rewards are constants (no gradient).

  estimator    surrogate per query                             what it assumes
  "vpg"        mean_l r_l * log pi(S)                          exact REINFORCE on the whole ordered list;
                                                               unbiased, variance grows with K
  "vpg_swr"    mean_l r_l * sum_k log p_{c_k}                  list read as K draws with replacement
  "capg"       mean_l r_l * log P(a_l in S)   (approx P)       credit only to the picked items (paper)
  "capg_exact" mean_l r_l * log P(a_l in S)   (exact P)        same, exponential-race P (ours)
  "top1"       mean_l r_l * log p_{a_l}                        CA-PG-SwR: drops a positive per-item factor

Loss = -mean over the batch. Why CA-PG has less variance: V-PG multiplies the reward by the score of all
K sampled items, so the K-1 unpicked ones add noise that averages out only over many samples; CA-PG
moves only the picked items' inclusion probabilities. When the LSR reward decomposes per item --
V = sum_a r(a) Prob[a picked] with Prob[a picked | S] = 1/K for a in S (a uniformly random pick) --
E[r(a) grad log P(a in S)] = (1/K) sum_a r(a) grad P(a in S) = grad V exactly, so CA-PG with the exact
P is unbiased there; for a selective LSR it optimises the paper's credit-assigned decomposition
instead (biased w.r.t. grad V, but pointing the same way).

CA-PG variants need r >= 0: a negative reward pushes the picked item's inclusion down without pushing
anything else up, so the update has no sensible direction. Map rewards into [0, inf) (see
``rag_capg.judges.to_reward``) or use ``group_baseline_rewards`` (advantages shifted to be >= 0).
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch

from rag_capg.pg.inclusion import log_inclusion_prob
from rag_capg.pg.policy import item_log_prob, plackett_luce_log_prob, with_replacement_log_prob

__all__ = ["Estimator", "ESTIMATORS", "surrogate_loss", "group_baseline_rewards", "gradient_variance"]

Estimator = Literal["vpg", "vpg_swr", "capg", "capg_exact", "top1"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
_CREDIT_ASSIGNED = ("capg", "capg_exact", "top1")


def _validate(estimator: str, logits: torch.Tensor, lists: torch.Tensor, picks: torch.Tensor,
              rewards: torch.Tensor) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (B, N) tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    B, N = logits.shape
    for name, t in (("lists", lists), ("picks", picks)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != B:
            raise ValueError(f"{name} must be a (B={B}, *) tensor of corpus indices, got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must hold integer corpus indices, got {t.dtype}")
    if lists.shape[1] > N:
        raise ValueError(f"lists have K={lists.shape[1]} items but the corpus has only N={N}")
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != tuple(picks.shape):
        raise ValueError(f"rewards must have the shape of picks {tuple(picks.shape)} (one reward per picked "
                         f"item), got {tuple(getattr(rewards, 'shape', ()))}")
    # The value checks below cost one host-device sync in all (one .tolist() of three flags), not one per
    # check: on CPU they are ~0.1% of a synthetic-benchmark step, on a GPU a sync each would stall the queue.
    # Every pick must come from its row's list (the LSR only sees the candidates); credit-assigned
    # estimators need r >= 0 (see the module docstring).
    no = torch.zeros((), dtype=torch.bool, device=rewards.device)
    has_values = picks.numel() > 0
    flags = torch.stack((
        ~torch.isfinite(rewards).all() if has_values else no,
        ~(picks[:, :, None] == lists[:, None, :]).any(dim=2).all() if has_values else no,
        rewards.min() < 0 if has_values and estimator in _CREDIT_ASSIGNED else no,
    )).tolist()
    if flags[0]:
        raise ValueError(f"rewards for estimator {estimator!r} contain NaN or infinite values")
    if flags[1]:
        raise ValueError("picks must be corpus indices taken from the same row of lists "
                         "(the LSR picks among the sampled candidates)")
    if flags[2]:
        low = float(rewards.min())
        raise ValueError(
            f"estimator {estimator!r} (credit-assigned) needs rewards >= 0, got a minimum reward of "
            f"{low:.6g}: map scores to non-negative rewards (reward mapping 'clip' or 'sigmoid') or "
            f"shift them with a baseline that keeps them >= 0 (group_baseline_rewards)")


def surrogate_loss(estimator: Estimator, logits: torch.Tensor, lists: torch.Tensor, picks: torch.Tensor,
                   rewards: torch.Tensor, *, exact_nodes: int = 12, exact_top_m: int | None = 23,
                   exact_tail: Literal["exact", "linear"] = "exact") -> torch.Tensor:
    """Scalar surrogate loss whose gradient w.r.t. logits is minus the estimator's policy gradient.

    logits (B, N) float with grad; lists (B, K) sampled candidates (corpus indices, PL order);
    picks (B, L) the LSR's picks (corpus indices, each in its row's list); rewards (B, L) float.
    exact_nodes / exact_top_m / exact_tail configure ``capg_exact`` (see
    ``rag_capg.pg.inclusion.inclusion_prob_exact``); exact_top_m=None runs the DP over all N items.
    """
    _validate(estimator, logits, lists, picks, rewards)
    r = rewards.detach()
    K = lists.shape[1]
    if estimator in ("vpg", "vpg_swr"):
        if estimator == "vpg":
            score = plackett_luce_log_prob(logits, lists)
        else:
            score = with_replacement_log_prob(logits, lists)
        # V-PG rewards the whole list with the mean of its picked rewards (averaged in the score's dtype,
        # never in half precision)
        list_reward = r.to(score.dtype).mean(dim=1)
        per_query = list_reward * score
    else:
        if estimator == "top1":
            score = item_log_prob(logits, picks)
        elif estimator == "capg":
            score = log_inclusion_prob(logits, picks, K, method="approx")
        else:
            score = log_inclusion_prob(logits, picks, K, method="exact", num_nodes=exact_nodes,
                                       top_m=exact_top_m, tail=exact_tail)
        per_query = (r.to(score.dtype) * score).mean(dim=1)
    return -per_query.mean().to(logits.dtype if logits.dtype == torch.float64 else torch.float32)


def group_baseline_rewards(rewards: torch.Tensor, *, min_std: float = 0.01) -> torch.Tensor:
    """Group-normalised advantages shifted to be non-negative, for G candidate lists per query.

    rewards (Q, G, L): Q queries, G lists (group) per query, L picked rewards per list. Per query,
    A = (r - mean) / max(std, min_std) over the group's G*L rewards (the GRPO-style advantage), then
    A - min(A) so the worst pick of the group gets 0 and every reward is >= 0, as CA-PG requires.
    The shift keeps the ordering within the group; a group with identical rewards gets all zeros.
    (Subtracting a constant is not an exactly unbiased baseline for the credit-assigned estimators --
    their scores do not have zero mean -- so the shift trades a little bias for scale invariance.)

    ``min_std`` is a floor on the divisor, in reward units. Dividing by the std alone (plus a 1e-6 guard)
    makes every group's advantages of order 1 however small its spread: a judge whose scores differ by
    2e-4 across a group of irrelevant candidates (noise, not a preference) gave shifted rewards of ~2, as
    large as a group with one relevant passage. With the floor, a group whose std is below ``min_std`` keeps
    its spread on the reward scale ((r - mean) / min_std: that noise gives rewards of ~0.02), and a group
    spread wider than it is normalised as before. The default, 0.01, suits rewards in [0, 1] (probabilities,
    cosines mapped by sigmoid) and grades; scale it with rewards of another range. 0 turns the floor off
    (pure scale invariance; a constant group still gets zeros).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 3:
        raise ValueError(f"rewards must be a (Q, G, L) tensor, got {tuple(getattr(rewards, 'shape', ()))}")
    if not min_std >= 0:
        raise ValueError(f"min_std must be >= 0, got {min_std}")
    flat = rewards.reshape(rewards.shape[0], -1).to(torch.float64 if rewards.dtype == torch.float64
                                                    else torch.float32)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True, unbiased=False) if flat.shape[1] > 1 else torch.zeros_like(mean)
    constant = flat.amax(dim=1, keepdim=True) == flat.amin(dim=1, keepdim=True)  # exactly 0, whatever round-off
    adv = torch.where(constant, 0.0, (flat - mean) / std.clamp_min(min_std).masked_fill(constant, 1.0))
    adv = adv - adv.min(dim=1, keepdim=True).values
    return adv.reshape(rewards.shape)


DrawFn = Callable[[torch.Tensor, torch.Generator | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def gradient_variance(estimator: Estimator, logits: torch.Tensor, draw_fn: DrawFn, num_samples: int, *,
                      generator: torch.Generator | None = None, chunk_size: int = 256,
                      **loss_options) -> dict[str, torch.Tensor | float]:
    """Monte-Carlo mean and variance of an estimator's gradient at fixed logits.

    draw_fn(logits (M, N), generator) -> (lists (M, K), picks (M, L), rewards (M, L)) draws fresh lists,
    LSR picks and rewards for M rows (the logits tiled ``chunk`` times; use the row's position modulo B
    if rewards depend on the query). Each sample is the gradient g_s (B, N) of the batch loss for one
    fresh draw; returns {"mean_gradient": (B, N) mean of g_s (the ascent direction, -d loss),
    "trace_variance": sum over coordinates of the unbiased variance of g_s (float),
    "num_samples": int}. Samples are vectorised: ``chunk_size`` draws of the whole batch at a time.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate a variance, got {num_samples}")
    base = logits.detach()
    B, N = base.shape
    total = torch.zeros(B, N, dtype=torch.float64, device=base.device)
    total_sq = torch.zeros_like(total)
    done = 0
    while done < num_samples:
        n = min(chunk_size, num_samples - done)
        x = base.repeat(n, 1).requires_grad_(True)  # row s*B + b is query b in sample s
        lists, picks, rewards = draw_fn(x.detach(), generator)
        loss = surrogate_loss(estimator, x, lists, picks, rewards, **loss_options)
        (grad,) = torch.autograd.grad(loss, x)
        # loss = mean over n*B rows = (1/n) sum_s loss_s, so each sample's gradient is n * grad of its rows
        g = -(grad.double() * n).reshape(n, B, N)  # ascent direction of V
        total += g.sum(dim=0)
        total_sq += (g * g).sum(dim=0)
        done += n
    mean = total / num_samples
    var = (total_sq - num_samples * mean * mean) / (num_samples - 1)
    return {"mean_gradient": mean, "trace_variance": float(var.clamp_min(0.0).sum()), "num_samples": num_samples}
