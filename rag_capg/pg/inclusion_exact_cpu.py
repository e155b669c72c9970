"""CA-PG-exact's inclusion probability on CPU: one autograd node, numba kernels.

``rag_capg.pg.inclusion.inclusion_prob_exact`` (``tail="exact"``, a ``top_m``) computes, per row and pick a,

    P(a in S) = sum_n w_n c v_n^(c-1) F_n,    F_n = sum_c D_n[c] T_n[K-1-c],

with D_n the distribution of arrivals among the M = top_m + 1 kept items (failure probabilities
q_jn = v_n^(r_j), r_j = w_j / w_ref; a's own slot, if a is kept, has r = 0) and T_n the CDF of the tail's
count, exp(lam (z-1) - s2 (z-1)^2 / 2) with lam = sum_tail p_j, s2 = sum_tail p_j^2, p_j = 1 - v_n^(r_j)
(``inclusion._tail_start``). In torch ops under autograd that is ~40 operations each way plus a pass
over (B, L, N, nodes) for the tail (the torch path, kept as the reference and the GPU path). Here:

1. ``_prepare``: per pick, r_j of the kept slots, c = w_a / w_ref, rho = w_M / w_ref (w_M: the lightest
   kept item, which bounds the tail), a's slot.
2. torch: q_jn = exp(r_j log v_n) for every slot and node, and the tail weights u_j = w_j / w_M <= 1 (two
   vectorised exps; numba's exp is scalar).
3. ``_forward``: per row the tail's sums, per pick lam and s2, the DP and its adjoint, the quadrature and
   every partial derivative of P.
4. ``_backward``: the stored partials times the incoming gradient, into a (B, N) gradient.

The tail without a pass over (N, nodes) per pick. With a_n = rho x_n, x_n = -log v_n, the far items
(u < 1/8, most of the tail) expand around u = 0:

    sum_far (1 - e^(-a u))   = sum_i (-1)^(i+1) a^i / i! Q_i,
    sum_far (1 - e^(-a u))^2 = sum_i (-1)^i (2^i - 2) a^i / i! Q_i,

Q_i = sum_far u^i, and the near ones (the tail's head, a few dozen) around u = 1, where every term is >= 0
(no cancellation, however large a): e^(-a u) = e^(-a) sum_i a^i (1 - u)^i / i!. The row's sums Q_i and
W_i = sum_near (1 - u)^i serve all its picks and nodes; each series runs until its terms fall below
_SERIES_TOL = 1e-13 of its leading one (``_series_terms``, ``_near_terms``), far below the method's own
error. A pick outside the kept set is itself in the tail: its own p_a, p_a^2 are subtracted.

Derivatives (w_ref and w_M are held fixed: P depends only on ratios of weights):
    kept j      r_j sum_n log v_n dP/dlog q_jn, from the DP's adjoint
    tail j      through Q_i and W_i: beta_i = dP/dQ_i, gamma_i = dP/dW_i per pick, then one polynomial
                in u_j (or 1 - u_j) per item in ``_backward``
    lam, s2     through the start f = exp(a0 + a1 z + a2 z^2): df_c / da_i = f_{c-i}
    a itself    sum_n w_n F_n jac_n (1 + c log v_n), plus its tail terms if it is in the tail
P is clamped at 1 like the torch path (it is never negative: every factor is >= 0, and the tail's CDF stays
>= 0 since s2 <= lam). tests/pg/test_inclusion_exact_cpu.py checks values and gradients
against ``inclusion._exact_torch``, which sums the tail's p_j directly.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from rag_capg.pg.poisson_binomial import MAX_SERIES_ARG, NEWTON_STEPS, TARGET_TIME
from rag_capg.pg.policy import _exp_or_zero

__all__ = ["exact_inclusion_cpu"]

_MAX_TERMS = 96  # series terms: 2 rho x <= MAX_SERIES_ARG = 40 needs <= 81 (_near_terms(40))
_SMALL_U = 1e-10  # tail weights below this enter the first power sum only: (rho x u)^2 / (rho x u) < 1e-8 and their
# share of lambda ~1e-10: below round-off. Their powers would underflow into slow subnormals.
_MAX_FAR_TERMS = 30  # _SMALL_U^30 = 1e-300 is still normal. (At 2 rho x = 40 the far series wants 31: up to
# ~6e-13 relative error there, above _SERIES_TOL, in a corner where a flat tail meets the cap.)
# Tail weights u >= _NEAR ("near": the tail's head, a few dozen items) are expanded around u = 1, with every term
# their series needs; the rest around u = 0, to the terms rho x _NEAR needs (e.g. 22 rather than 60).
_NEAR = 0.125
_SERIES_TOL = 1e-13  # relative truncation error of the tail series: far below the method's (~1e-5 .. 1e-4)
_LOG_SERIES_TOL = math.log(_SERIES_TOL)
_MAX_RATIO = math.exp(700.0)  # r_j capped here: v^r is 0 at every node anyway
_LOG_Q_FLOOR = -700.0  # v^r below e^-700 is taken as 0 (torch's exp is slow on subnormal results)


@numba.njit(cache=True, nogil=True)
def _prepare(s, top, items, k, tail_sum, x_max, newton_steps, target_time, max_series_arg, r, d_r_ok, c, rho,
             slot):  # pragma: no cover - compiled
    """Per pick: r (B, L, M) = the kept slots' w_j / w_ref (0 in a's slot), capped at e^700, d_r_ok = whether
    r_j moves with s_j (not capped, not a's slot), c = w_a / w_ref, rho = w_M / w_ref, slot = a's position among
    the kept items or -1; w_ref = max(w_a, K-th largest other weight) / alpha, alpha = the pick's time scale
    (``inclusion._time_scale``). tail_sum (B,): the row's tail weights relative to w_M. Returns False (and the
    caller takes the torch path) if a row's maximum or a pick's w_ref is not finite (+inf, NaN, too few items
    of positive weight)."""
    B, M = top.shape
    L = items.shape[1]
    for b in range(B):
        if not math.isfinite(s[b, top[b, 0]]):  # torch.topk puts NaN first
            return False
        s_m = np.float64(s[b, top[b, M - 1]])
        for l in range(L):
            a = items[b, l]
            pos = -1
            for j in range(M):
                if top[b, j] == a:
                    pos = j
            s_a = np.float64(s[b, a])
            kth = top[b, k] if 0 <= pos < k else top[b, k - 1]  # a among the top-K shifts the K-th other
            s_ref = max(s_a, np.float64(s[b, kth]))
            if not math.isfinite(s_ref):
                return False
            slot[b, l] = pos
            # ratios to w_ref, then the pick's time scale alpha (inclusion._time_scale) and w_ref /= alpha
            c_a, rho_a = math.exp(s_a - s_ref), math.exp(s_m - s_ref)
            for j in range(M):
                d = np.float64(s[b, top[b, j]]) - s_ref
                r[b, l, j] = 0.0 if j == pos else math.exp(min(d, 700.0))
                d_r_ok[b, l, j] = j != pos and d < 700.0  # (and below, not capped after scaling either)
            tail_rate = max(rho_a * tail_sum[b] - (c_a if pos < 0 else 0.0), 0.0)  # a leaves the tail
            x = 0.0
            for _ in range(newton_steps):  # Newton from 0 on a concave increasing function: monotone
                f, df = tail_rate * x - (k - 0.5), tail_rate
                for j in range(M):
                    e = math.exp(-r[b, l, j] * x)
                    f += 1.0 - e
                    df += r[b, l, j] * e
                if not df > 0.0:  # nothing else has weight (all underflowed): K arrivals never come
                    x = math.inf
                    break
                x -= f / df
            r_kth = math.exp(np.float64(s[b, kth]) - s_ref)
            alpha = min(max(x, 1.0 / (r_kth + tail_rate + c_a)), 1.0 / c_a if c_a > 0.0 else math.inf) / target_time
            if rho_a > 0.0 and M < s.shape[1]:  # (no tail, no series)
                alpha = min(alpha, max_series_arg / (2.0 * rho_a * x_max))
            c[b, l] = c_a * alpha
            rho[b, l] = rho_a * alpha
            for j in range(M):  # capped at e^700 as before (an inf made exp's backward 0 * inf = NaN)
                scaled = r[b, l, j] * alpha
                d_r_ok[b, l, j] = d_r_ok[b, l, j] and scaled < _MAX_RATIO
                r[b, l, j] = min(scaled, _MAX_RATIO)
    return True


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _tail_sums(u, n_far, n_near, near, u_far, pw, vals, far_sums, near_sums):  # pragma: no cover - compiled
    """One row's tail sums (u: its tail weights, 0 on the kept items): far_sums[i] = sum u_j^(i+1) over the far
    items (u_j < _NEAR), i < n_far, vectorised over all N (near items masked to 0); near_sums[i] = sum
    (1 - u_j)^i over the near ones, i <= n_near. Writes the near items' indices to near[:count] and returns
    count. Far weights below _SMALL_U enter the first sum only (their powers would underflow into slow
    subnormals, and u^2 / u < 1e-10 there). u_far, pw, vals: scratch of length N."""
    N = u.shape[0]
    acc = 0.0
    count = 0
    for j in range(N):
        uj = np.float64(u[j])
        is_near = uj >= _NEAR
        far = 0.0 if is_near else uj
        acc += far
        u_far[j] = far
        pw[j] = far if far >= _SMALL_U else 0.0
        near[count] = j  # branch-free compaction: the slot is kept only if u_j is near
        count += is_near
    far_sums[0] = acc
    for i in range(1, n_far):  # pw >= _SMALL_U^i: a normal number for every i < _MAX_FAR_TERMS
        acc = 0.0
        for j in range(N):
            pw[j] *= u_far[j]
            acc += pw[j]
        far_sums[i] = acc
    near_sums[0] = count
    for t in range(count):
        vals[t] = 1.0 - np.float64(u[near[t]])
        pw[t] = 1.0
    for i in range(1, n_near + 1):  # term by term, vectorised over the near items
        acc = 0.0
        for t in range(count):
            pw[t] *= vals[t]
            acc += pw[t]
        near_sums[i] = acc
    return count


@numba.njit(cache=True, nogil=True)
def _series_terms(y):  # pragma: no cover - compiled
    """Terms of sum_i y^i / i! Q_i (Q_i <= Q_0) until a term falls below _SERIES_TOL Q_0."""
    term = 1.0
    for i in range(1, _MAX_TERMS + 1):
        term *= y / i
        if i > y and term < _SERIES_TOL:
            return max(i - 1, 1)
    return _MAX_TERMS


@numba.njit(cache=True, nogil=True)
def _near_terms(y):  # pragma: no cover - compiled
    """Terms of e^(-y) sum_i y^i / i! W_i, W_i = sum (1 - u)^i <= W_0 (1 - _NEAR)^i, until the rest is below
    _SERIES_TOL W_0. (For i < y a term's maximum over the nodes' a <= y is ~(1 - _NEAR)^i; beyond y it is at
    a = y.)"""
    z = y * (1.0 - _NEAR)
    log_term = -y  # log(e^-y z^i / i!)
    for i in range(1, _MAX_TERMS + 1):
        log_term += math.log(z / i)
        if i > y and log_term < _LOG_SERIES_TOL:
            return i
    return _MAX_TERMS


# The Poisson-binomial DP of one pick. (Every numba function _forward calls lives in this file: numba's cache
# is invalidated by changes to the caller's file only, so a callee elsewhere could run stale.)


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _triangle_dp_forward(q, S):  # pragma: no cover - compiled
    """S[j] (k, n) = distribution of the number of arrivals among the first j kept items (q (M, n): each
    item's probability of not having arrived), from none. Item j arrives (count + 1) with probability 1 - q:
    S'[c] = q S[c] + (1 - q) S[c-1], one FMA. After j items the count is at most j, so only c <= j + 1 is
    updated: the upper triangle (K^2 / 2 of the M K cells) is never touched, nor read."""
    M, n = q.shape
    k = S.shape[1]
    for t in range(n):
        S[0, 0, t] = 1.0
    for j in range(M):
        for t in range(n):
            S[j + 1, 0, t] = q[j, t] * S[j, 0, t]
        for cc in range(1, min(j + 1, k)):
            for t in range(n):
                S[j + 1, cc, t] = S[j, cc - 1, t] + q[j, t] * (S[j, cc, t] - S[j, cc - 1, t])
        if j + 1 < k:  # S[j, j + 1] = 0
            for t in range(n):
                S[j + 1, j + 1, t] = (1.0 - q[j, t]) * S[j, j, t]


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _triangle_dp_adjoint(q, S, G, log_v, d_r):  # pragma: no cover - compiled
    """The adjoint of ``_triangle_dp_forward``: on entry G (k, n) = dP/dS[M], and d_r[j] = sum_n log v_n
    dP/dlog q_jn with dP/dlog q_jn = q_jn sum_c G_{j+1}[c] (S_j[c] - S_j[c-1]), over the same triangle
    (S_j[c] = 0 for c > j; G_j is needed for c <= j only). Summed by parts, sum_c S_j[c] (G[c] - G[c+1]), so
    that one pass over c both accumulates it and steps G back: G_j[c] = G[c+1] + q (G[c] - G[c+1]). Nodes
    go four at a time (n is a multiple of 4), their accumulators in registers, rather than a loop over the
    nodes inside the loop over c."""
    M, n = q.shape
    k = G.shape[0]
    for j in range(M - 1, -1, -1):
        hi = min(j + 1, k - 1)  # S_{j+1} holds counts 0..hi, so G[c] is live for c <= hi
        d = 0.0
        for t in range(0, n, 4):
            q0, q1, q2, q3 = q[j, t], q[j, t + 1], q[j, t + 2], q[j, t + 3]
            a0 = a1 = a2 = a3 = 0.0
            for cc in range(min(j, k - 1) + 1):  # S_j[c] = 0 beyond c = j
                if cc + 1 <= hi:
                    h0, h1, h2, h3 = G[cc + 1, t], G[cc + 1, t + 1], G[cc + 1, t + 2], G[cc + 1, t + 3]
                else:  # the last count: its mass leaves the truncation, G[K] = 0
                    h0 = h1 = h2 = h3 = 0.0
                g0, g1, g2, g3 = G[cc, t] - h0, G[cc, t + 1] - h1, G[cc, t + 2] - h2, G[cc, t + 3] - h3
                a0 += S[j, cc, t] * g0
                a1 += S[j, cc, t + 1] * g1
                a2 += S[j, cc, t + 2] * g2
                a3 += S[j, cc, t + 3] * g3
                G[cc, t], G[cc, t + 1] = h0 + q0 * g0, h1 + q1 * g1
                G[cc, t + 2], G[cc, t + 3] = h2 + q2 * g2, h3 + q3 * g3
            d += q0 * a0 * log_v[t] + q1 * a1 * log_v[t + 1] + q2 * a2 * log_v[t + 2] + q3 * a3 * log_v[t + 3]
        d_r[j] = d


@numba.njit(cache=True, nogil=True)
def _tail_moments(a_n, far_sums, n_far, near_sums, n_near, n_close, lam, s2, term, t1, t2, e1, e2):  # pragma: no cover
    """lam_n = sum_tail (1 - e^(-a_n u)) and s2_n = sum_tail (1 - e^(-a_n u))^2 from the row's sums (module
    docstring); term, t1, t2, e1, e2: scratch over the nodes."""
    n = a_n.shape[0]
    lam[:] = 0.0
    s2[:] = 0.0
    term[:] = 1.0
    for i in range(n_far):  # far items: series in u, power i + 1
        sign = 1.0 if i % 2 == 0 else -1.0
        two = 2.0 ** (i + 1) - 2.0
        for t in range(n):
            term[t] *= a_n[t] / (i + 1)
            lam[t] += sign * term[t] * far_sums[i]
            s2[t] -= sign * two * term[t] * far_sums[i]
    if n_close > 0:  # near items: e^(-a u) = e^(-a) sum_i a^i (1 - u)^i / i!, every term >= 0
        for t in range(n):
            t1[t] = math.exp(-a_n[t])
            t2[t] = t1[t] * t1[t]
            e1[t] = t1[t] * near_sums[0]
            e2[t] = t2[t] * near_sums[0]
        for i in range(1, n_near + 1):
            for t in range(n):
                t1[t] *= a_n[t] / i
                t2[t] *= 2.0 * a_n[t] / i
                e1[t] += t1[t] * near_sums[i]
                e2[t] += t2[t] * near_sums[i]
        for t in range(n):
            lam[t] += near_sums[0] - e1[t]
            s2[t] += near_sums[0] - 2.0 * e1[t] + e2[t]


@numba.njit(cache=True, nogil=True)
def _tail_moment_partials(a_n, d_lam, d_s2, n_far, n_near, n_close, beta, gamma, term, t1, t2):  # pragma: no cover
    """beta_i = dP/dQ_i (far sums) and gamma_i = dP/dW_i (near sums) from dP/dlam_n and dP/ds2_n: the
    coefficients of ``_tail_moments`` contracted over the nodes."""
    n = a_n.shape[0]
    term[:] = 1.0
    for i in range(n_far):
        sign = 1.0 if i % 2 == 0 else -1.0
        two = 2.0 ** (i + 1) - 2.0
        acc = 0.0
        for t in range(n):
            term[t] *= a_n[t] / (i + 1)
            acc += term[t] * (d_lam[t] - two * d_s2[t])
        beta[i] = sign * acc
    if n_close > 0:  # d lam / d W_i = -t1_i, d s2 / d W_i = t2_i - 2 t1_i
        for t in range(n):
            t1[t] = math.exp(-a_n[t])
            t2[t] = t1[t] * t1[t]
        for i in range(1, n_near + 1):
            acc = 0.0
            for t in range(n):
                t1[t] *= a_n[t] / i
                t2[t] *= 2.0 * a_n[t] / i
                acc += (t2[t] - 2.0 * t1[t]) * d_s2[t] - t1[t] * d_lam[t]
            gamma[i] = acc


@numba.njit(cache=True, nogil=True)
def _forward(q, r, d_r_ok, c, rho, slot, u, top, log_v, weights, k, need_grad,
             p_out, d_kept, d_pick, beta, gamma, terms, near):  # pragma: no cover - compiled
    """p_out (B, L) = P(a in S). If need_grad: d_kept (B, L, M) = dP/ds of each kept slot, d_pick (B, L) =
    dP/ds_a through its own weight, beta (B, L, _MAX_TERMS) = dP/d far_sums, gamma (B, L, _MAX_TERMS + 1) =
    dP/d near_sums, terms (B, 3) = the row's far / near series lengths and near-item count, near (B, N) = the
    near items, for ``_backward``. u (B, N): tail weights relative to the M-th kept logit, 0 on the kept items."""
    B, L, M, n = q.shape
    N = u.shape[1]
    has_tail = M < N
    x = -log_v
    u_far, pw, vals = np.empty(N), np.empty(N), np.empty(N)
    far_sums = np.zeros(_MAX_TERMS)
    near_sums = np.zeros(_MAX_TERMS + 1)
    lam, s2 = np.empty(n), np.empty(n)
    d_lam, d_s2 = np.empty(n), np.empty(n)
    d0, d1, d2 = np.empty(n), np.empty(n), np.empty(n)
    lam_live, s2_live = np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.bool_)
    a_n, term, t1, t2, e1, e2 = np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    pmf = np.empty((k, n))
    tail_cdf = np.empty((k, n))
    kept_cdf = np.empty((k, n))
    S = np.empty((M + 1, k, n))
    G = np.empty((k, n))
    f_n = np.empty(n)  # F_n at each node, kept for d_pick
    jw = np.empty(n)
    d_r = np.empty(M)
    x_max = x.max()
    for b in range(B):
        n_far = n_near = n_close = 0
        if has_tail:
            # the row's tail sums, as many terms as its largest 2 rho x (s2's series) needs
            rho_max = 0.0
            for l in range(L):
                rho_max = max(rho_max, rho[b, l])
            y2 = 2.0 * rho_max * x_max
            n_near = _near_terms(y2)
            n_far = min(_series_terms(y2 * _NEAR), n_near, _MAX_FAR_TERMS)
            n_close = _tail_sums(u[b], n_far, n_near, near[b], u_far, pw, vals, far_sums, near_sums)
            terms[b, 0], terms[b, 1], terms[b, 2] = n_far, n_near, n_close
        for l in range(L):
            c_a = c[b, l]
            # lam_n = sum_j p_j and s2_n = sum_j p_j^2 over the tail (module docstring), minus a's own terms
            lam[:] = 0.0
            s2[:] = 0.0
            if has_tail:
                for t in range(n):
                    a_n[t] = rho[b, l] * x[t]
                _tail_moments(a_n, far_sums, n_far, near_sums, n_near, n_close, lam, s2, term, t1, t2, e1, e2)
                for t in range(n):
                    if slot[b, l] < 0:
                        p_a = -math.expm1(-c_a * x[t])
                        lam[t] -= p_a
                        s2[t] -= p_a * p_a
                    lam_live[t] = lam[t] > 0.0
                    s2_live[t] = s2[t] > 0.0
                    lam[t] = max(lam[t], 0.0)
                    s2[t] = max(s2[t], 0.0)
            # the DP's start: the second-order tail distribution (inclusion._tail_start)
            for t in range(n):
                pmf[0, t] = math.exp(-lam[t] - 0.5 * s2[t])
                if k > 1:
                    pmf[1, t] = (lam[t] + s2[t]) * pmf[0, t]
            for cc in range(1, k - 1):
                for t in range(n):
                    pmf[cc + 1, t] = ((lam[t] + s2[t]) * pmf[cc, t] - s2[t] * pmf[cc - 1, t]) / (cc + 1)
            # the tail's CDF: F_n = sum_c S_M[c] tail_cdf[K-1-c] (kept and tail counts are independent)
            for t in range(n):
                tail_cdf[0, t] = pmf[0, t]
            for cc in range(1, k):
                for t in range(n):
                    tail_cdf[cc, t] = tail_cdf[cc - 1, t] + pmf[cc, t]
            _triangle_dp_forward(q[b, l], S)
            # quadrature: jw_n = w_n c v_n^(c-1), the Jacobian of q = v^c
            for t in range(n):
                jw[t] = weights[t] * math.exp(math.log(c_a) + (c_a - 1.0) * log_v[t]) if c_a > 0.0 else 0.0
                f_n[t] = 0.0
            for cc in range(k):  # (counts outer, nodes inner: vectorised)
                for t in range(n):
                    f_n[t] += S[M, cc, t] * tail_cdf[k - 1 - cc, t]
            total = 0.0
            for t in range(n):
                total += jw[t] * f_n[t]
            clamped = total > 1.0
            p_out[b, l] = min(total, 1.0)
            if not need_grad:
                continue
            beta[b, l, :] = 0.0
            gamma[b, l, :] = 0.0
            if clamped:
                d_kept[b, l, :] = 0.0
                d_pick[b, l] = 0.0
                continue
            grad_a = 0.0
            for t in range(n):
                grad_a += jw[t] * f_n[t] * (1.0 + c_a * log_v[t])
            for cc in range(k):
                for t in range(n):
                    G[cc, t] = jw[t] * tail_cdf[k - 1 - cc, t]
            # dP / d pmf[c'] = jw sum_{c <= K-1-c'} S_M[c] = kept_cdf[K-1-c']
            for t in range(n):
                kept_cdf[0, t] = jw[t] * S[M, 0, t]
            for cc in range(1, k):
                for t in range(n):
                    kept_cdf[cc, t] = kept_cdf[cc - 1, t] + jw[t] * S[M, cc, t]
            _triangle_dp_adjoint(q[b, l], S, G, log_v, d_r)
            for j in range(M):
                d_kept[b, l, j] = d_r[j] * r[b, l, j] if d_r_ok[b, l, j] else 0.0
            if has_tail:
                # d/d(a0, a1, a2) of the coefficients of f = exp(a0 + a1 z + a2 z^2) is z^i f: f shifted by i;
                # dP / d pmf[c] = kept_cdf[K-1-c]
                for t in range(n):
                    d0[t] = kept_cdf[k - 1, t] * pmf[0, t]
                    d1[t] = 0.0
                    d2[t] = 0.0
                for cc in range(1, k):
                    for t in range(n):
                        g = kept_cdf[k - 1 - cc, t]
                        d0[t] += g * pmf[cc, t]
                        d1[t] += g * pmf[cc - 1, t]
                for cc in range(2, k):
                    for t in range(n):
                        d2[t] += kept_cdf[k - 1 - cc, t] * pmf[cc - 2, t]
                for t in range(n):  # a0 = -lam - s2/2, a1 = lam + s2, a2 = -s2/2
                    d_lam[t] = (d1[t] - d0[t]) if lam_live[t] else 0.0
                    d_s2[t] = (d1[t] - 0.5 * d0[t] - 0.5 * d2[t]) if s2_live[t] else 0.0
                    if slot[b, l] < 0:  # a's own terms -p_a, -p_a^2: d p_a / d s_a = c x e^(-c x)
                        e = math.exp(-c_a * x[t])
                        grad_a -= (d_lam[t] + 2.0 * (1.0 - e) * d_s2[t]) * c_a * x[t] * e
                _tail_moment_partials(a_n, d_lam, d_s2, n_far, n_near, n_close, beta[b, l], gamma[b, l], term, t1, t2)
            d_pick[b, l] = grad_a


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _backward(grad_p, d_kept, d_pick, beta, gamma, terms, near, u, top, items, tiny, grad):  # pragma: no cover
    """grad (B, N) = sum_l grad_p[b, l] dP_bl/ds: kept slots and picks from their partials; tail items through
    the tail sums, d far_sums_i / d s_j = (i + 1) u_j^(i+1) and d near_sums_i / d s_j = -i u_j (1 - u_j)^(i-1),
    to as many terms as the forward pass summed (Horner, vectorised over the items). Values below ``tiny``
    are written as 0."""
    B, N = u.shape
    M = top.shape[1]
    L = items.shape[1]
    coef = np.zeros(_MAX_TERMS)
    coef_near = np.zeros(_MAX_TERMS + 1)
    vals, val = np.empty(N), np.empty(N)
    for b in range(B):
        n_far, n_near, count = terms[b, 0], terms[b, 1], terms[b, 2]
        if n_far > 0:
            for i in range(n_far):
                acc = 0.0
                for l in range(L):
                    acc += grad_p[b, l] * beta[b, l, i]
                coef[i] = (i + 1) * acc
            for i in range(1, n_near + 1):
                acc = 0.0
                for l in range(L):
                    acc += grad_p[b, l] * gamma[b, l, i]
                coef_near[i] = -i * acc
            for j in range(N):  # far: u sum_i coef_i u^i (weights below _SMALL_U: the linear term)
                uj = np.float64(u[b, j])
                vals[j] = uj if uj >= _SMALL_U else 0.0
                val[j] = coef[n_far - 1]
            for i in range(n_far - 2, -1, -1):
                ci = coef[i]
                for j in range(N):
                    val[j] = val[j] * vals[j] + ci
            for j in range(N):
                v = val[j] * np.float64(u[b, j])
                grad[b, j] = v if abs(v) >= tiny else 0.0
            for t in range(count):  # near: u sum_i coef_near_i (1 - u)^(i-1)
                vals[t] = 1.0 - np.float64(u[b, near[b, t]])
                val[t] = coef_near[n_near]
            for i in range(n_near - 1, 0, -1):
                ci = coef_near[i]
                for t in range(count):
                    val[t] = val[t] * vals[t] + ci
            for t in range(count):
                v = val[t] * (1.0 - vals[t])
                grad[b, near[b, t]] = v if abs(v) >= tiny else 0.0
        else:
            grad[b, :] = 0.0
        for j in range(M):
            acc = 0.0
            for l in range(L):
                acc += grad_p[b, l] * d_kept[b, l, j]
            grad[b, top[b, j]] = acc
        for l in range(L):
            grad[b, items[b, l]] += grad_p[b, l] * d_pick[b, l]


class _ExactInclusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, top, items, k, log_v, weights, prepared, need_grad):
        r, d_r_ok, c, rho, slot, u = prepared
        B, L, M = r.shape
        log_q = torch.from_numpy(r)[..., None] * log_v  # (B, L, M, n)
        # 0 below the floor, not e^-700: the adjoint's dq/dlog q = q times r ~ e^700 would be O(1)
        q = torch.exp(log_q.clamp_min(_LOG_Q_FLOOR)).masked_fill_(log_q < _LOG_Q_FLOOR, 0.0)
        p = np.empty((B, L))
        d_kept = np.empty((B, L, M) if need_grad else (0, 0, 0))
        d_pick = np.empty((B, L) if need_grad else (0, 0))
        beta = np.empty((B, L, _MAX_TERMS) if need_grad else (0, 0, 0))
        gamma = np.empty((B, L, _MAX_TERMS + 1) if need_grad else (0, 0, 0))
        terms = np.zeros((B, 3), dtype=np.int64)
        near = np.empty((B, s.shape[1]), dtype=np.int64)
        _forward(q.numpy(), r, d_r_ok, c, rho, slot, u.numpy(), top.numpy(), log_v.numpy(), weights.numpy(),
                 k, need_grad, p, d_kept, d_pick, beta, gamma, terms, near)
        ctx.save_for_backward(u, top, items)
        ctx.partials = (d_kept, d_pick, beta, gamma, terms, near)
        return torch.from_numpy(p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_p):
        u, top, items = ctx.saved_tensors
        grad = np.empty(tuple(u.shape), dtype=u.numpy().dtype)
        _backward(grad_p.double().contiguous().numpy(), *ctx.partials, u.numpy(), top.numpy(), items.numpy(),
                  float(torch.finfo(u.dtype).tiny), grad)
        return torch.from_numpy(grad), None, None, None, None, None, None, None


def exact_inclusion_cpu(s: torch.Tensor, top: torch.Tensor, items: torch.Tensor, k: int, log_v: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor | None:
    """P(a in S_K), (B, L) float64, for float32/64 CPU logits s (B, N), their top-M indices ``top`` (B, M, best
    first; M = top_m + 1 > K), picks ``items`` (B, L), and the quadrature's float64 log-nodes / weights on
    [0, 1]. Differentiable with respect to s. None (the caller takes the torch path) where a row's maximum
    or a pick's reference weight is not finite."""
    s = s.contiguous()  # outside no_grad: a copy must stay in the graph
    top, items = top.to(torch.int64).contiguous(), items.to(torch.int64).contiguous()
    B, L = items.shape
    M = top.shape[1]
    with torch.no_grad():
        # tail weights relative to the M-th kept logit, in the logits' dtype (their rounding is far below the
        # method's error), 0 on the kept items
        s_m = s.gather(1, top[:, -1:])
        s_m = torch.where(s_m > float("-inf"), s_m, 0.0)  # a -inf bound: its whole tail is -inf (u = 0, not NaN)
        u = _exp_or_zero((s - s_m).clamp_max_(0.0)).scatter_(1, top, 0.0)
        tail_sum = u.sum(dim=1).double()  # (only for the time scale: float32 is plenty; a float64 sum copies u)
    prepared = (np.empty((B, L, M)), np.empty((B, L, M), dtype=np.bool_), np.empty((B, L)), np.empty((B, L)),
                np.empty((B, L), dtype=np.int64))
    # the time-scale constants go in as arguments: numba's cache would keep another module's globals stale
    if not _prepare(s.detach().numpy(), top.numpy(), items.numpy(), k, tail_sum.numpy(), float(-log_v.min()),
                    NEWTON_STEPS, TARGET_TIME, MAX_SERIES_ARG, *prepared):
        return None
    prepared += (u,)
    need_grad = s.requires_grad and torch.is_grad_enabled()  # (grad mode is off inside forward)
    # nodes padded to a multiple of 4 for the adjoint: v = 1 (nothing has arrived), weight 0 (adds nothing)
    log_v, weights = log_v.double(), weights.double()
    if log_v.shape[0] % 4:
        pad = log_v.new_zeros(-log_v.shape[0] % 4)
        log_v, weights = torch.cat((log_v, pad)), torch.cat((weights, pad))
    return _ExactInclusion.apply(s, top, items, k, log_v, weights, prepared, need_grad)
