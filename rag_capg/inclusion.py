"""Inclusion probability P(a in S_K) of an item a in a Plackett-Luce list of size K, for CA-PG.

CA-PG credits each LSR-picked item a with r(a) * grad log P(a in S_K). Two ways to get P(a in S_K):

1. ``inclusion_prob_approx`` -- the paper's approximation

       P(a in S) ~ 1 - prod_{k=1..K} (1 - p_k(a)),   p_k(a) = w_a / (sum_j w_j - sum_{j<k} w_{b_j}),

   with b_1..b_{K-1} the deterministic top-(K-1) items by the current logits, a excluded (indices chosen
   without gradient, their logits keep it). It pretends the K-1 items drawn before a are the best ones,
   so it over-estimates mid-ranked items (e.g. 0.44 against a true 0.31 at N=200, K=20) and is cheap:
   one top-K on the detached logits per row serves every pick. As in ``policy``, the denominators are
   written as sums of the *remaining* weights (tail mass + suffix sums of the top-K), never as
   1 - (prefix mass), so a peaked policy does not cancel them to zero.

2. ``inclusion_prob_exact`` -- exact, by the exponential race. Give item j an arrival time
   T_j ~ Exp(w_j); the arrival order is PL-distributed, and a is in the top-K iff at most K-1 others
   arrive before T_a. Conditioning on T_a = t and substituting q = exp(-w_a t):

       P(a in S) = int_0^1 Prob[ PoissonBinomial({1 - q^(w_j / w_a)}_{j != a}) <= K-1 ] dq.

   For a low-ranked a, w_j / w_a is huge and the integrand is a spike near q = 1. We substitute
   q = v^c, c = w_a / w_ref <= 1, w_ref = max(w_a, K-th largest other weight):

       P(a in S) = int_0^1 c v^(c-1) G(v) dv,   G(v) = Prob[ PB({1 - v^(w_j / w_ref)}) <= K-1 ].

   Now only the <= K-1 items heavier than w_ref have exponents > 1, and G(v) = O(v) as v -> 0 whenever
   c < 1 (the K heaviest others have all arrived), so c v^(c-1) G(v) stays bounded and smooth enough for
   Gauss-Legendre (error ~1e-4 with 32 nodes across ranks in our checks). The integral is invariant to
   w_ref, so w_ref is taken without gradient. The Poisson-binomial CDF truncated at K-1 is the O(N K)
   dynamic programme over the others (state: Prob[count = 0..K-1]) for every (row, pick, node) at once,
   in ``rag_capg.poisson_binomial``: a fused numba kernel on CPU that also returns the gradient (the
   adjoint of the DP), the plain torch recurrence under autograd elsewhere.
   (Caveat, measured: for a pick with P ~ 1, the quadrature's derivative w.r.t. c is
   1 + sum_n w_n log v_n ~ 6e-4 at 32 nodes instead of 0; the clamp to [0, 1] hides it only when
   round-off puts the sum at >= 1.)

   ``top_m``: keep the m heaviest others exactly and replace the rest by one Poisson term (Le Cam). Its
   rate is lambda(v) = sum_{tail} p_j(v), p_j(v) = 1 - v^(w_j/w_ref) (``tail="exact"``), or the linear
   upper bound lambda(v) = -log v * sum_{tail} w_j / w_ref (``tail="linear"``: the tail is raced as one
   Poisson process, i.e. drawn with replacement; O(1) per node instead of O(N)). Bias of the integrand at
   each node: Le Cam gives TV <= sum_{tail} p_j(v)^2; the linear rate adds at most
   sum_{tail} (p_j - lambda_j)  <= sum_{tail} (w_j log v / w_ref)^2 / 2. Since m >= K every tail weight is
   <= w_ref, and in practice (tail weights << w_ref) the error is far below Monte-Carlo noise.

Everything is computed in float64 from the (upcast) logits and is differentiable by autograd. Top-k
selections go through ``rag_capg.top_k.top_k_indices`` (``torch.topk``'s result, faster on CPU).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from rag_capg.poisson_binomial import race_truncated_cdf, truncated_cdf
from rag_capg.policy import _check_index, _check_logits, _exp_or_zero, _logsumexp_excluding, _upcast
from rag_capg.top_k import top_k_indices

try:  # numba ships with our ranx dependency
    from rag_capg.inclusion_approx_cpu import approx_inclusion_cpu

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

__all__ = ["inclusion_prob_approx", "inclusion_prob_exact", "log_inclusion_prob"]

_TINY = 1e-300


def _check(logits: torch.Tensor, items: torch.Tensor, k: int) -> None:
    _check_logits(logits)
    _check_index(logits, items, "items")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, N={logits.shape[1]}], got {k}")


# ----------------------------------------------------------------------------------------------------
# 1. The paper's top-prefix approximation


def _approx(logits: torch.Tensor, items: torch.Tensor, k: int, *, log_p: bool) -> torch.Tensor:
    """log P_approx(a in S) (log_p=True) or log(1 - P_approx(a in S)), shape (B, L), float64.

    On CPU (with numba) one fused autograd node (``rag_capg.inclusion_approx_cpu``); elsewhere, and for
    K = N or NaN logits, the torch expression below, which is also the reference in the tests.
    log P is taken as log(-expm1(log(1 - P))), accurate even when P is tiny.
    """
    s = _upcast(logits)
    with torch.no_grad():
        top = top_k_indices(s, k)  # (B, K), best first
    if _HAVE_NUMBA and s.device.type == "cpu":
        fused = approx_inclusion_cpu(s, top, items, log_p=log_p)
        if fused is not None:
            return fused
    log_one_minus = _log_one_minus_approx_torch(s, top, items, k)
    return torch.log(-torch.expm1(log_one_minus)) if log_p else log_one_minus


def _log_one_minus_approx_torch(s: torch.Tensor, top: torch.Tensor, items: torch.Tensor, k: int) -> torch.Tensor:
    """log(1 - P_approx(a in S)) = sum_k log(R_k / (R_k + w_a)) in torch ops under autograd, given the top-K
    ``top`` of the logits s. (B, L) float64.

    R_k = weight of everything except a and its prefix b_1..b_{k-1}. With the row's top-K (indices
    t_0..t_{K-1}, best first) and the mass beyond it (tail T):
      * a outside the top-K: b = t_0..t_{K-2}, so R_k = (T - w_a) + sum_{i >= k-1} w_{t_i};
      * a = t_r: b = the other K-1 top items, R_k = T + (sum of the non-a top items from the k-th on),
        and R_K = T.
    Both are "tail + reverse cumsum of the top-K weights with a's entry zeroed", where a's own slot
    holds R_K = T (the product over k is order-free, so the slots need no re-ordering).
    """
    # one gather for the top-K and the picks (one scatter in backward), one exp for all the weights
    gathered = s.gather(1, torch.cat((top, items), dim=1))  # (B, K + L)
    log_tail = _logsumexp_excluding(s, top)  # mass outside the top-K, no cancellation
    # weights relative to the row maximum, in float64: ratios are all that matter
    ref = gathered[:, :1].detach()
    u = torch.exp((torch.cat((gathered, log_tail[:, None]), dim=1) - ref).double())
    u_top, u_a, u_tail = u.split((k, items.shape[1], 1), dim=1)  # (B, K), (B, L), (B, 1)
    is_a = top[:, None, :] == items[:, :, None]  # (B, L, K)
    in_top = is_a.any(dim=2)
    e = torch.where(is_a, 0.0, u_top[:, None, :])
    suffix = e.flip(2).cumsum(2).flip(2)  # sum_{i >= position} of the non-a top weights
    tail_other = (u_tail - torch.where(in_top, 0.0, u_a)).clamp_min(0.0)  # a leaves the tail if there
    rest = (tail_other[..., None] + torch.where(is_a, 0.0, suffix)).clamp_min(_TINY)
    return -torch.log1p(u_a[..., None] / rest).sum(dim=2)


def inclusion_prob_approx(logits: torch.Tensor, items: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's approximation 1 - prod_k (1 - p_k(a)) for each item (B, L). Returns float64 (B, L)."""
    _check(logits, items, k)
    return -torch.expm1(_approx(logits, items, k, log_p=False))


# ----------------------------------------------------------------------------------------------------
# 2. Exact: exponential race + Gauss-Legendre + Poisson-binomial DP


@lru_cache(maxsize=16)
def _gauss_legendre_01(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    return (x + 1.0) / 2.0, w / 2.0  # nodes and weights on [0, 1]


def _poisson_pmf_truncated(rate: torch.Tensor, k: int) -> torch.Tensor:
    """Prob[Poisson(rate) = c] for c = 0..k-1, as a new last dimension (log-space, stable for any rate)."""
    c = torch.arange(k, dtype=rate.dtype, device=rate.device)
    rate = rate.clamp_min(_TINY)[..., None]
    return torch.exp(c * torch.log(rate) - rate - torch.lgamma(c + 1.0))


def _poisson_pmf_columns(rate: torch.Tensor, k: int) -> torch.Tensor:
    """``_poisson_pmf_truncated`` of the flattened rates with the count first, (K, rate.numel()): the
    layout the Poisson-binomial DP reads, so no transposed copy is needed."""
    c = torch.arange(k, dtype=rate.dtype, device=rate.device)[:, None]
    rate = rate.reshape(1, -1).clamp_min(_TINY)
    return torch.exp(c * torch.log(rate) - rate - torch.lgamma(c + 1.0))


def _truncated_cdf(state: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Prob[count <= K-1] of the Poisson-binomial DP (``rag_capg.poisson_binomial``) in this module's layout.

    state: (..., K) initial distribution of the count over 0..K-1 (one-hot at 0, or a Poisson tail);
    probs: (M, ...) success probability of each item. Each item moves mass c -> c+1 with probability p;
    mass pushed past K-1 is dropped (we only need the CDF at K-1). ``inclusion_prob_exact`` itself calls
    ``race_truncated_cdf`` with log(1 - p_j(v)) = r_j log v, exact even where p rounds to 1.
    """
    flat_state = state.reshape(-1, state.shape[-1]).T  # (K, X)
    log_q = torch.log1p(-probs).reshape(probs.shape[0], -1)
    return truncated_cdf(log_q, flat_state).reshape(state.shape[:-1])


def _binned_tail_rate(s: torch.Tensor, top: torch.Tensor, s_ref: torch.Tensor, log_v: torch.Tensor,
                      *, width: float = 0.25, num_bins: int = 48) -> torch.Tensor:
    """sum_{j in row tail} (1 - v^(r_j)) with the tail grouped into bins of ``width`` nats of logit.

    A bin of n items with total relative weight W contributes n (1 - v^(W/n)): exact when its weights are
    equal and, as 1 - v^r is concave in r, an upper bound off by <= (log v)^2 sum_j (r_j - W/n)^2 / 2
    (within-bin ratios are <= e^width). Costs (B, L, bins, nodes) instead of (B, L, N, nodes). The last
    bin collects everything lighter, where 1 - v^r ~ -r log v is linear and the grouping exact in the
    limit. Rows: the items beyond the top-(m+1) (``top``); differentiable through W.
    """
    B, N = s.shape
    with torch.no_grad():
        s_bound = s.gather(1, top[:, -1:])  # the lightest kept logit: tail logits are <= it
        pos = (s_bound - s).div_(width).floor_().clamp_(0, num_bins - 1)  # (B, N) bin of each item
        pos.masked_fill_(~(s > float("-inf")), num_bins)  # weightless (-inf) and NaN items stay out
        idx = pos.long().scatter_(1, top, num_bins)  # the top-(m+1) go to a discarded bin
        ones = torch.ones(1, 1, dtype=s.dtype, device=s.device).expand(B, N)
        counts = torch.zeros(B, num_bins + 1, dtype=s.dtype, device=s.device).scatter_add_(1, idx, ones)[:, :num_bins]
    # <= 1 on the tail. The top-(m+1), which go to the discarded bin, are capped at 1 too: a top logit ~710+
    # nats above the bound overflowed exp to inf, and the discarded bin's zero gradient times inf was NaN
    # (CA-PG-exact at Adagrad 0.3 stopped at step 12,161 of the synthetic benchmark).
    u = _exp_or_zero((s - s_bound.detach()).clamp_max(0.0))
    w_bins = torch.zeros(B, num_bins + 1, dtype=s.dtype, device=s.device).scatter_add(1, idx, u)[:, :num_bins]
    # (B, 1, bins) * (B, L, 1): each row's bins scaled by that row's picks (not (1, B, bins), which would
    # broadcast row l's bins onto pick l of every row)
    mean_r = (w_bins / counts.clamp_min(1.0))[:, None, :] * torch.exp(s_bound.detach() - s_ref)[..., None]
    return _BinRate.apply(mean_r, counts, log_v)  # (B, L, n)


class _BinRate(torch.autograd.Function):
    """rate[b, l, n] = sum_k counts[b, k] (1 - v_n^(r[b, l, k])), with d rate / d r = -counts v^r log v.

    Autograd through mul / expm1 / neg / mul / sum would make ~10 passes over the (B, L, bins, nodes)
    tensor; here the forward is one expm1 and one contraction, and the backward reuses expm1 (v^r = e + 1)
    in one more contraction. Same arithmetic as the plain expression, to round-off.
    """

    @staticmethod
    def forward(ctx, mean_r: torch.Tensor, counts: torch.Tensor, log_v: torch.Tensor) -> torch.Tensor:
        e = torch.expm1(mean_r[..., None] * log_v)  # v^r - 1, (B, L, bins, n)
        ctx.save_for_backward(e, counts, log_v)
        return -torch.einsum("bk,blkn->bln", counts, e)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rate: torch.Tensor):
        e, counts, log_v = ctx.saved_tensors
        g = grad_rate * log_v  # (B, L, n)
        # sum_n g (e + 1) without forming e + 1
        s = torch.einsum("blkn,bln->blk", e, g) + g.sum(dim=-1, keepdim=True)
        return -counts[:, None, :] * s, None, None


def inclusion_prob_exact(logits: torch.Tensor, items: torch.Tensor, k: int, *, num_nodes: int = 32,
                         top_m: int | None = None,
                         tail: Literal["binned", "exact", "linear"] = "binned") -> torch.Tensor:
    """Exact P(a in S_K) for each item (B, L) by the exponential race (module docstring). float64 (B, L).

    num_nodes: Gauss-Legendre nodes on [0, 1] (32 gives ~1e-4 absolute error; 48-64 for tests).
    top_m: if set (>= K), the m heaviest other items go through the exact DP and the rest through a
    Poisson term of rate ``tail`` ("exact": sum of their p_j(v); "linear": their total weight times
    -log v). None = all N-1 others exactly (O(N) loop; for small N and tests).
    """
    _check(logits, items, k)
    s = _upcast(logits).double()
    B, N = s.shape
    if k >= N:  # the list holds every item
        return torch.ones(items.shape, dtype=s.dtype, device=s.device)
    nodes, weights = (torch.as_tensor(a, dtype=s.dtype, device=s.device) for a in _gauss_legendre_01(num_nodes))
    log_v = nodes.log()  # (n,)
    s_a = s.gather(1, items)  # (B, L)
    use_tail = top_m is not None and top_m + 1 < N
    m = min(top_m, N - 1) if use_tail else N - 1
    if use_tail and m < k:
        raise ValueError(f"top_m must be >= k (the K heaviest others set the scale), got top_m={top_m}, k={k}")

    with torch.no_grad():
        top = top_k_indices(s, m + 1)  # (B, m+1), best first
        is_a = top[:, None, :] == items[:, :, None]  # (B, L, m+1)
        in_top = is_a.any(dim=2)
        # the m heaviest others: the top-(m+1) without a, or without its last item when a is not in it
        pos = torch.arange(m + 1, device=s.device)
        drop = torch.where(in_top[..., None], is_a, pos == m)
        keep_pos = torch.argsort(drop.to(torch.int8), dim=2, stable=True)[..., :m]  # (B, L, m), sorted
        keep = top.gather(1, keep_pos.reshape(B, -1)).reshape(keep_pos.shape)
    s_keep = s.gather(1, keep.reshape(B, -1)).reshape(keep.shape)  # (B, L, m), descending
    # w_ref = max(w_a, K-th largest other): the scale that makes the integrand smooth (no gradient needed)
    s_ref = torch.maximum(s_a, s_keep[..., k - 1]).detach()
    c = torch.exp(s_a - s_ref)  # (B, L), <= 1
    # (B, L, m). Capped at e^700: beyond it v^r is 0 at every node anyway, and an inf ratio (an item 710+ nats
    # above the pick's scale) made exp's backward 0 * inf = NaN.
    r_keep = torch.exp((s_keep - s_ref[..., None]).clamp_max(700.0))

    if use_tail:
        dropped = top[:, m]  # (B,): the (m+1)-th item, in the tail for picks outside the top-(m+1)
        s_dropped = s.gather(1, dropped[:, None])  # (B, 1)
        out = ~in_top  # (B, L): a is itself in the row tail and must leave it; the dropped item joins
        if tail == "linear":
            log_tail = _logsumexp_excluding(s, top)  # (B,)
            w_tail = (torch.exp(log_tail[:, None] - s_ref)
                      + torch.where(out, torch.exp(s_dropped - s_ref) - c, 0.0)).clamp_min(0.0)
            rate = -w_tail[..., None] * log_v  # (B, L, n)
        elif tail == "exact":
            s_rest = s.scatter(1, top, float("-inf"))  # row tail: items beyond the top-(m+1)
            r_rest = torch.exp(s_rest[:, None, :] - s_ref[..., None])  # (B, L, N), 0 for excluded
            rate = -torch.expm1(r_rest[..., None] * log_v).sum(dim=2)  # (B, L, n)
        elif tail == "binned":
            rate = _binned_tail_rate(s, top, s_ref, log_v)
        else:
            raise ValueError(f"tail must be 'binned', 'exact' or 'linear', got {tail!r}")
        if tail != "linear":  # a leaves the tail, the dropped (m+1)-th item joins it
            r_dropped = torch.exp(s_dropped - s_ref)
            rate = rate + torch.where(out[..., None], -torch.expm1(r_dropped[..., None] * log_v)
                                      + torch.expm1(c[..., None] * log_v), 0.0)
            rate = rate.clamp_min(0.0)
        state = _poisson_pmf_columns(rate, k)  # (K, B*L*n): count first, columns ordered (b, l, node)
    else:
        state = torch.zeros(k, B * s_a.shape[1] * num_nodes, dtype=s.dtype, device=s.device)
        state[0] = 1.0

    # G(v) at every node: the DP over the kept others, whose failure probabilities are 1 - p_j(v) = v^(r_j)
    cdf = race_truncated_cdf(r_keep.reshape(-1, m).T, log_v, state).reshape(*s_a.shape, num_nodes)
    # Jacobian of q = v^c: dq = c v^(c-1) dv
    jacobian = torch.exp(torch.log(c)[..., None] + (c[..., None] - 1.0) * log_v)
    return ((weights * jacobian * cdf).sum(dim=-1)).clamp(0.0, 1.0)


def log_inclusion_prob(logits: torch.Tensor, items: torch.Tensor, k: int, *,
                       method: Literal["approx", "exact"] = "approx", num_nodes: int = 32,
                       top_m: int | None = None, tail: Literal["binned", "exact", "linear"] = "binned") -> torch.Tensor:
    """log P(a in S_K), (B, L), float64. "approx" is computed as log(-expm1(log(1 - P))), accurate even
    when P is tiny; "exact" as the log of the quadrature (clamped away from 0)."""
    if method == "approx":
        _check(logits, items, k)
        return _approx(logits, items, k, log_p=True)
    if method == "exact":
        p = inclusion_prob_exact(logits, items, k, num_nodes=num_nodes, top_m=top_m, tail=tail)
        return torch.log(p.clamp_min(_TINY))
    raise ValueError(f"method must be 'approx' or 'exact', got {method!r}")
