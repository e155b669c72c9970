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

   Now (before the time scale below) only the <= K-1 items heavier than w_ref have exponents > 1, and
   c v^(c-1) G(v) stays bounded. The integral does not depend on w_ref, so it is a free time scale, taken
   without gradient: each pick divides it by its own alpha (``_time_scale``) so that the integrand's step --
   where G falls from 1 to 0, at v ~ 0.8 for a flat policy, far lower for a sharp one -- always lands where
   the nodes are. Near v = 0 the
   integrand behaves like a non-integer power of v, so the nodes are Gauss-Legendre in y with v = y^(3/2)
   (``_quadrature_01``). Together, with top_m 23: 12 nodes are about as accurate (~1e-4 in P) as 32 plain
   ones with top_m 64 were (eval/RESULTS.md).
   G is a Poisson-binomial CDF truncated at K-1: a dynamic programme over the others (state: Prob[count =
   0..K-1]) at every node.
   (Caveat, measured: for a pick with P ~ 1, the quadrature's derivative w.r.t. c is 1 + sum_n w_n log v_n,
   not exactly 0; the clamp to [0, 1] hides it only when round-off puts the sum at >= 1.)

   ``top_m``: the DP runs over the top_m + 1 heaviest items of the row (a's own slot, if a is one of them,
   left empty: an item that never arrives), and the rest -- the tail -- enters as one term. With
   p_j(v) = 1 - v^(w_j/w_ref), lambda = sum_tail p_j and s2 = sum_tail p_j^2, the tail's count is drawn
   from exp(lambda (z - 1) - s2 (z - 1)^2 / 2) (``_tail_start``: the tail's generating function to second
   order; Le Cam's Poisson(lambda) is first order, error <= s2, this one errs by O(sum p_j^3) and was
   10-200x closer on the synthetic benchmark's logits). ``tail="linear"`` instead races the tail as one
   Poisson process of rate sum_tail w_j / w_ref (drawn with replacement; O(1) per node; no second-order
   term). Every tail weight is <= the kept ones', so with top_m >= K every p_j is below the K-th other's.

   On CPU (numba, a finite row maximum and reference weights, ``tail="exact"``) all of it is one fused node,
   ``rag_capg.pg.inclusion_exact_cpu``: the tail sums from the row's power sums instead of a pass over
   (N, nodes) per pick, the DP and its adjoint per pick. ``_exact_torch`` is the same maths in torch ops
   under autograd, for other devices and as the tests' reference.

Everything is computed in float64 from the (upcast) logits and is differentiable by autograd. Top-k
selections go through ``rag_capg.pg.top_k.top_k_indices`` (``torch.topk``'s result, faster on CPU).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from rag_capg.pg.poisson_binomial import MAX_SERIES_ARG, NEWTON_STEPS, TARGET_TIME, kernels_enabled, race_truncated_cdf
from rag_capg.pg.policy import _check_index, _check_logits, _logsumexp_excluding, _upcast
from rag_capg.pg.top_k import top_k_indices

try:  # numba ships with our ranx dependency
    from rag_capg.pg.inclusion_approx_cpu import approx_inclusion_cpu
    from rag_capg.pg.inclusion_exact_cpu import exact_inclusion_cpu

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

    On CPU (with numba) one fused autograd node (``rag_capg.pg.inclusion_approx_cpu``); elsewhere, and for
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


_NODE_POWER = 1.5


@lru_cache(maxsize=16)
def _quadrature_01(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [0, 1] for the race integral: Gauss-Legendre in y, then v = y^(3/2).

    Near v = 0 the integrand behaves like v^e with a non-integer e (G(v) ~ v^(sum of the light others' r_j),
    times c v^(c-1)); its derivatives blow up there and plain Gauss-Legendre converges slowly. v = y^p turns
    that into y^(p (e + 1) - 1), smoother, at the cost of fewer nodes near v = 1, where the
    heavy items' v^(r_j) are steep. p = 3/2 was best of 1 / 1.5 / 2 / 2.5 / 3 on the synthetic benchmark's
    logits (eval/RESULTS.md).
    """
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    y, w = (x + 1.0) / 2.0, w / 2.0
    return y ** _NODE_POWER, w * _NODE_POWER * y ** (_NODE_POWER - 1.0)


def _tail_start(lam: torch.Tensor, s2: torch.Tensor, k: int) -> torch.Tensor:
    """The DP's starting distribution over counts 0..K-1 for a tail with sum p_j = lam and sum p_j^2 = s2,
    (K, lam.numel()), count first (the layout the Poisson-binomial DP reads).

    The tail's generating function is prod_j (1 + p_j (z - 1)) = exp(sum_i (-1)^(i+1) S_i (z - 1)^i / i),
    S_i = sum_j p_j^i. Keeping i = 1 is the Poisson(lam) of Le Cam (error <= S_2); keeping i = 2 as well,
    exp(a0 + a1 z + a2 z^2) with a2 = -S_2 / 2, a1 = lam + S_2, a0 = -lam - S_2 / 2, errs by O(S_3) and
    was 10-200x closer to the exact tail on the synthetic benchmark's logits (eval/RESULTS.md). Its
    coefficients follow from f' = (a1 + 2 a2 z) f: f_0 = e^a0, (c + 1) f_{c+1} = a1 f_c + 2 a2 f_{c-1}. (It is
    a signed measure: a coefficient can dip below 0 where the tail is far from Poisson; P is clamped.)
    s2 = 0 gives the Poisson pmf exactly."""
    lam, s2 = lam.reshape(-1), s2.reshape(-1)
    a2, a1 = -0.5 * s2, lam + s2
    f = [torch.exp(-lam - 0.5 * s2)]
    if k > 1:
        f.append(a1 * f[0])
    for c in range(1, k - 1):
        f.append((a1 * f[c] + 2.0 * a2 * f[c - 1]) / (c + 1))
    return torch.stack(f)


def inclusion_prob_exact(logits: torch.Tensor, items: torch.Tensor, k: int, *, num_nodes: int = 32,
                         top_m: int | None = None, tail: Literal["exact", "linear"] = "exact") -> torch.Tensor:
    """Exact P(a in S_K) for each item (B, L) by the exponential race (module docstring). float64 (B, L).

    num_nodes: quadrature nodes on [0, 1] (12-16 give ~1e-4 absolute error on the synthetic benchmark's
    logits; 48-64 for tests).
    top_m: if set (>= K), the race keeps the top_m + 1 heaviest items exactly (a's own slot, if it is one
    of them, left empty) and the rest goes into a tail term: "exact", to second order in its p_j(v), or
    "linear", one Poisson process of their total weight (module docstring). None = all N - 1 others
    exactly. On CPU with an exact tail (and finite row maxima): one fused node (``rag_capg.pg.inclusion_exact_cpu``);
    otherwise the torch expression ``_exact_torch``, which is also the reference in the tests.
    """
    _check(logits, items, k)
    if tail not in ("exact", "linear"):
        raise ValueError(f"tail must be 'exact' or 'linear', got {tail!r}")
    s = _upcast(logits)
    B, N = s.shape
    if k >= N:  # the list holds every item
        return torch.ones(items.shape, dtype=torch.float64, device=s.device)
    use_tail = top_m is not None and top_m + 1 < N
    if use_tail and top_m < k:
        raise ValueError(f"top_m must be >= k (the K heaviest others set the scale), got top_m={top_m}, k={k}")
    nodes, weights = (torch.as_tensor(a, dtype=torch.float64, device=s.device) for a in _quadrature_01(num_nodes))
    log_v = nodes.log()  # (n,)
    with torch.no_grad():
        top = top_k_indices(s, top_m + 1 if use_tail else N)  # (B, M), best first
    if _HAVE_NUMBA and kernels_enabled() and s.device.type == "cpu" and (tail == "exact" or not use_tail):
        fused = exact_inclusion_cpu(s, top, items, k, log_v, weights)
        if fused is not None:
            return fused
    return _exact_torch(s.double(), items, k, top, log_v, weights, tail if use_tail else None)


def _time_scale(r: torch.Tensor, c: torch.Tensor, r_kth: torch.Tensor, tail_rate: torch.Tensor,
                rho: torch.Tensor, k: int, x_max: float) -> torch.Tensor:
    """alpha (B, L): rescale time so that the pick's integrand c e^(-c x) G(x), x = -log v, spans x ~ 1.

    With fixed nodes the integrand's step (where G falls from 1 to 0) sits anywhere: at v ~ 0.8 for a flat
    policy, near 0 for a sharp one, so 20 fixed nodes were needed for ~1e-4. The integral does not depend on
    w_ref, so we pick it per pick: x* solves E[arrivals by x] = K - 1/2 (Newton from 0 over the kept items and
    the tail's linear rate; concave, so the iterates rise monotonically), the scale is
    T = min(max(x*, 1 / (r_K + tail rate + c)), 1 / c) -- the second term is the K-th arrival's own time when
    K - 1 heavy items come first (a sharp policy), 1 / c the decay of e^(-c x) -- and alpha = T / TARGET_TIME.
    12 nodes then came about as close as 20 fixed ones to a 200-node reference (the DP over all items,
    logit scales 1-3; P within ~5e-5). Capped so that 2 rho x stays <= MAX_SERIES_ARG
    in the CPU kernel's tail series. r (B, L, M): kept ratios (0 in a's slot); all inputs relative to w_ref."""
    x = torch.zeros_like(c)
    never = torch.zeros_like(c, dtype=torch.bool)  # nothing else has weight (all underflowed): x* = inf
    for _ in range(NEWTON_STEPS):
        e = torch.exp(-r * x[..., None])
        df = (r * e).sum(dim=-1) + tail_rate
        never |= ~(df > 0)
        x = torch.where(never, x, x - ((1.0 - e).sum(dim=-1) + tail_rate * x - (k - 0.5)) / df)
    x = x.masked_fill(never, float("inf"))
    alpha = torch.minimum(torch.maximum(x, 1.0 / (r_kth + tail_rate + c)), 1.0 / c) / TARGET_TIME
    return torch.where(rho > 0, torch.minimum(alpha, MAX_SERIES_ARG / (2.0 * rho * x_max)), alpha)


# float64 elements the torch path may hold in one intermediate of a chunk of rows: 2^22 = 32 MiB
_EXACT_TORCH_MAX_ELEMENTS = 2 ** 22


def _exact_torch(s: torch.Tensor, items: torch.Tensor, k: int, top: torch.Tensor, log_v: torch.Tensor,
                 weights: torch.Tensor, tail: Literal["exact", "linear"] | None) -> torch.Tensor:
    """``inclusion_prob_exact`` in torch ops under autograd (any device), given the top-M indices ``top``
    (M > K) and the nodes; tail=None when ``top`` holds every item.

    Memory: the exact tail sums p_j(v) over every tail item at every node, a float64 (rows, L, N, nodes)
    intermediate, and the DP keeps a (K, rows * L * nodes) state per kept item for backward; at B*G = 128
    rows that was 0.15 GiB saved for backward at N = 5,183 and would be ~120 GiB at N = 1M. Every row is
    computed on its own (no op mixes rows), so the rows are split into chunks whose largest intermediate
    holds at most ``_EXACT_TORCH_MAX_ELEMENTS`` elements (at least one row per chunk), and under autograd
    each chunk is checkpointed (``torch.utils.checkpoint``: its intermediates are recomputed in backward
    instead of kept), which costs one more forward of this function. Each row's value and gradient are
    bit for bit those of the row computed alone, and within round-off (~1e-16) of the whole batch in one
    piece, which itself differs from its rows alone in the last bit (torch's kernels depend on the shape).
    """
    rows = items.shape[0]
    per_row = items.shape[1] * log_v.shape[0] * ((s.shape[1] if tail == "exact" else 0) + top.shape[1] * k)
    chunk = max(1, _EXACT_TORCH_MAX_ELEMENTS // max(per_row, 1))
    if chunk >= rows:
        return _exact_torch_rows(s, items, k, top, log_v, weights, tail)
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and s.requires_grad
    out = []
    for r0 in range(0, rows, chunk):
        args = (s[r0:r0 + chunk], items[r0:r0 + chunk], k, top[r0:r0 + chunk], log_v, weights, tail)
        out.append(checkpoint(_exact_torch_rows, *args, use_reentrant=False, preserve_rng_state=False)
                   if grad else _exact_torch_rows(*args))
    return torch.cat(out)


def _exact_torch_rows(s: torch.Tensor, items: torch.Tensor, k: int, top: torch.Tensor, log_v: torch.Tensor,
                      weights: torch.Tensor, tail: Literal["exact", "linear"] | None) -> torch.Tensor:
    """``_exact_torch`` on one chunk of rows."""
    s_a = s.gather(1, items)  # (B, L)
    s_top = s.gather(1, top)  # (B, M), descending
    is_a = top[:, None, :] == items[:, :, None]  # (B, L, M): a's own slot, which stays empty
    out = ~is_a.any(dim=2)  # (B, L): a is itself in the row tail and must leave it
    with torch.no_grad():
        # w_ref = max(w_a, K-th largest other) / alpha: the scale that makes the integrand smooth (no gradient
        # needed). The K-th largest other is the K-th of the row, or the (K+1)-th when a is among the top K.
        kth = torch.where(is_a[..., :k].any(dim=2), s_top[:, k:k + 1], s_top[:, k - 1:k])
        s_ref = torch.maximum(s_a, kth)
        r0 = torch.where(is_a, 0.0, torch.exp((s_top[:, None, :] - s_ref[..., None]).clamp_max(700.0)))
        c0 = torch.exp(s_a - s_ref)
        rho0 = torch.exp(s_top[:, -1:] - s_ref) if tail is not None else torch.zeros_like(c0)
        tail_rate = ((torch.exp(_logsumexp_excluding(s, top)[:, None] - s_ref) - torch.where(out, c0, 0.0))
                     .clamp_min(0.0) if tail is not None else torch.zeros_like(c0))
        s_ref = s_ref - torch.log(_time_scale(r0, c0, torch.exp(kth - s_ref), tail_rate, rho0, k,
                                              float(-log_v.min())))
    c = torch.exp(s_a - s_ref)  # (B, L)
    # (B, L, M). Capped at e^700: beyond it v^r is 0 at every node anyway, and an inf ratio (an item 710+ nats
    # above the pick's scale) made exp's backward 0 * inf = NaN.
    r = torch.where(is_a, 0.0, torch.exp((s_top[:, None, :] - s_ref[..., None]).clamp_max(700.0)))

    if tail is not None:
        if tail == "linear":  # one Poisson process: exactly Poisson, no second-order term
            log_tail = _logsumexp_excluding(s, top)  # (B,)
            w_tail = (torch.exp(log_tail[:, None] - s_ref) - torch.where(out, c, 0.0)).clamp_min(0.0)
            rate = -w_tail[..., None] * log_v  # (B, L, n)
            second = torch.zeros_like(rate)
        else:
            s_rest = s.scatter(1, top, float("-inf"))  # row tail: items beyond the top-M
            r_rest = torch.exp(s_rest[:, None, :] - s_ref[..., None])  # (B, L, N), 0 for excluded
            p_rest = -torch.expm1(r_rest[..., None] * log_v)  # (B, L, N, n): p_j(v) of every tail item
            p_a = torch.where(out[..., None], -torch.expm1(c[..., None] * log_v), 0.0)  # a leaves the tail
            rate = (p_rest.sum(dim=2) - p_a).clamp_min(0.0)
            second = (p_rest.square().sum(dim=2) - p_a.square()).clamp_min(0.0)
        state = _tail_start(rate, second, k)  # (K, B*L*n): count first, columns ordered (b, l, node)
    else:
        state = torch.zeros(k, s_a.numel() * log_v.shape[0], dtype=s.dtype, device=s.device)
        state[0] = 1.0

    # G(v) at every node: the DP over the kept others, whose failure probabilities are 1 - p_j(v) = v^(r_j)
    cdf = race_truncated_cdf(r.reshape(-1, r.shape[-1]).T, log_v, state).reshape(*s_a.shape, log_v.shape[0])
    # Jacobian of q = v^c: dq = c v^(c-1) dv
    jacobian = torch.exp(torch.log(c)[..., None] + (c[..., None] - 1.0) * log_v)
    return ((weights * jacobian * cdf).sum(dim=-1)).clamp(0.0, 1.0)


def log_inclusion_prob(logits: torch.Tensor, items: torch.Tensor, k: int, *,
                       method: Literal["approx", "exact"] = "approx", num_nodes: int = 32,
                       top_m: int | None = None, tail: Literal["exact", "linear"] = "exact") -> torch.Tensor:
    """log P(a in S_K), (B, L), float64. "approx" is computed as log(-expm1(log(1 - P))), accurate even
    when P is tiny; "exact" as the log of the quadrature (clamped away from 0)."""
    if method == "approx":
        _check(logits, items, k)
        return _approx(logits, items, k, log_p=True)
    if method == "exact":
        p = inclusion_prob_exact(logits, items, k, num_nodes=num_nodes, top_m=top_m, tail=tail)
        return torch.log(p.clamp_min(_TINY))
    raise ValueError(f"method must be 'approx' or 'exact', got {method!r}")
