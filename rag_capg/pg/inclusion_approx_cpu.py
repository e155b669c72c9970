"""The paper's inclusion-probability approximation on CPU: one autograd node, two numba kernels.

``rag_capg.pg.inclusion._approx`` computes, per row b and pick a,

    log(1 - P_approx(a in S)) = -sum_{i=1..K} log1p(w_a / R_i),     and log P = log(-expm1(that)),

R_i = the weight left after removing a and the first i-1 of the other top items: "tail + suffix sum of
the top-K weights with a's entry zeroed" (see ``inclusion._log_one_minus_approx_torch``). Written with
torch ops under autograd it is ~25 small (B, L, K) operations forward and as many backward, plus a
gather backward that zero-fills and scatters a (B, N) gradient and another (B, N) add to accumulate it:
at K = 20, B = 128, N = 1,000 that was most of CA-PG's extra time over TOP1. Here the (B, N) work is
what must be: one exp pass for the tail mass (torch, vectorised) in forward, one scaled copy of it in
backward; everything small is one numba loop that also writes the partial derivatives, so the backward
pass is a second loop.

Derivatives (all weights relative to the row maximum m, u_j = exp(s_j - m); the value depends only on
ratios of weights, so holding m fixed gives the exact gradient):

    d/d R_i        h_i = w_a / (R_i (R_i + w_a))                       (0 where R_i is clamped)
    d/d w_a        -sum_i 1 / (R_i + w_a)     and, if a is in the tail, -sum_i h_i (it leaves the tail)
    d/d u_top_j    sum_{i <= j, i != slot(a)} h_i                      (R_i holds u_top_j iff j >= i)
    d/d T          sum_i h_i                                            (T = tail mass, in every R_i)

and d/d s_j = u_j d/d u_j; for a tail item d/d s_j = e_j d/d T with e_j = exp(s_j - m). For log P every
partial is scaled by d log P / d log(1 - P) = exp(v) / expm1(v), v = log(1 - P).
Clamps mirror the torch reference (R_i >= 1e-300, tail mass left after a >= 0), so both agree to
round-off; tests/pg/test_inclusion_approx_cpu.py checks values and gradients against it.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from rag_capg.pg.policy import _exp_or_zero, _min_exact_mass

__all__ = ["approx_inclusion_cpu"]

_TINY = 1e-300


@numba.njit(cache=True, nogil=True)
def _forward(s, top, items, tail, log_p, value, d_top, d_pick, d_tail):  # pragma: no cover - compiled
    """value (B, L) = log P_approx if log_p else log(1 - P_approx); d_top (B, L, K), d_pick (B, L): d value /
    d logit of the top items and of the pick; d_tail (B, L): d value / d T (T = tail mass / row maximum)."""
    B, K = top.shape
    L = items.shape[1]
    u_top = np.empty(K)
    h = np.empty(K)
    for b in range(B):
        m = np.float64(s[b, top[b, 0]])  # the row maximum: every weight is relative to it
        for i in range(K):
            u_top[i] = math.exp(np.float64(s[b, top[b, i]]) - m)
        for l in range(L):
            a = items[b, l]
            u_a = math.exp(np.float64(s[b, a]) - m)
            slot = -1
            for i in range(K):
                if top[b, i] == a:
                    slot = i
            # the tail mass without a (a leaves the tail when it is not one of the top-K)
            tail_other = np.float64(tail[b]) - (u_a if slot < 0 else 0.0)
            tail_live = tail_other >= 0.0
            if not tail_live:
                tail_other = 0.0
            suffix = 0.0
            val = 0.0
            grad_a = 0.0
            h_sum = 0.0
            for i in range(K - 1, -1, -1):
                if i == slot:
                    rest = tail_other  # a's own slot holds R_K = the tail
                else:
                    suffix += u_top[i]
                    rest = tail_other + suffix
                if rest >= _TINY:
                    h[i] = u_a / (rest * (rest + u_a))
                else:
                    rest = _TINY
                    h[i] = 0.0
                val -= math.log1p(u_a / rest)
                grad_a -= 1.0 / (rest + u_a)
                h_sum += h[i]
            cumulative = 0.0
            for j in range(K):
                if j == slot:
                    d_top[b, l, j] = 0.0
                else:
                    cumulative += h[j]
                    d_top[b, l, j] = cumulative * u_top[j]
            d_tail[b, l] = h_sum if tail_live else 0.0
            if slot < 0:
                grad_a -= d_tail[b, l]
            d_pick[b, l] = grad_a * u_a
            value[b, l] = val
            if log_p:  # log P = log(-expm1(val)), accurate for tiny P; d log P / d val = exp(val) / expm1(val)
                value[b, l] = math.log(-math.expm1(val))
                scale = math.exp(val) / math.expm1(val)
                for j in range(K):
                    d_top[b, l, j] *= scale
                d_pick[b, l] *= scale
                d_tail[b, l] *= scale


@numba.njit(cache=True, nogil=True)
def _backward(grad_value, d_top, d_pick, d_e, e, top, items, tiny, grad):  # pragma: no cover - compiled
    """grad (B, N) = d loss / d logits for an incoming grad_value (B, L); d_e (B, L): d value / d e_j, the
    derivative with respect to one tail weight as stored in e. Tail gradients below ``tiny`` (the smallest
    normal float of grad's dtype) are written as 0: subnormal gradients slow down every later product."""
    B, N = e.shape
    K = top.shape[1]
    L = items.shape[1]
    for b in range(B):
        coef_tail = 0.0
        for l in range(L):
            coef_tail += grad_value[b, l] * d_e[b, l]
        for j in range(N):  # e is 0 on the top-K, so this is the tail items' gradient
            v = e[b, j] * coef_tail
            grad[b, j] = v if abs(v) >= tiny else 0.0
        for i in range(K):
            acc = 0.0
            for l in range(L):
                acc += grad_value[b, l] * d_top[b, l, i]
            grad[b, top[b, i]] += acc
        for l in range(L):
            grad[b, items[b, l]] += grad_value[b, l] * d_pick[b, l]


class _ApproxInclusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, top, items, e, tail, e_scale, log_p):
        B, L = items.shape
        K = top.shape[1]
        value = np.empty((B, L))
        d_top, d_pick, d_tail = np.empty((B, L, K)), np.empty((B, L)), np.empty((B, L))
        _forward(s.detach().numpy(), top.numpy(), items.numpy(), tail.numpy(), log_p, value, d_top, d_pick, d_tail)
        ctx.save_for_backward(e, top, items)
        if e_scale is not None:  # T = e_scale * sum(e): d value / d e_j
            d_tail *= e_scale.numpy()[:, None]
        ctx.partials = (d_top, d_pick, d_tail)
        return torch.from_numpy(value)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        e, top, items = ctx.saved_tensors
        grad = np.empty(tuple(e.shape), dtype=e.numpy().dtype)
        _backward(grad_value.double().contiguous().numpy(), *ctx.partials, e.numpy(), top.numpy(), items.numpy(),
                  float(torch.finfo(e.dtype).tiny), grad)
        return torch.from_numpy(grad), None, None, None, None, None, None


def approx_inclusion_cpu(s: torch.Tensor, top: torch.Tensor, items: torch.Tensor, *,
                         log_p: bool) -> torch.Tensor | None:
    """log P_approx(a in S) (log_p=True) or log(1 - P_approx(a in S)), (B, L) float64, for float32/64 CPU
    logits s (B, N) and their top-K ``top`` (B, K, best first). None where the fast path does not apply
    (K = N: no tail; NaN logits): the caller then runs the torch reference."""
    s = s.contiguous()  # outside no_grad: a copy must stay in the graph
    with torch.no_grad():
        top = top.to(torch.int64).contiguous()
        items = items.to(torch.int64).contiguous()
        row_max = s.gather(1, top[:, :1])
        e = _exp_or_zero(s - row_max).scatter_(1, top, 0.0)  # tail weights / row maximum
        tail = e.sum(dim=1)
        e_scale = None
        small = ~(tail >= _min_exact_mass(e.dtype, e.shape[1]))  # and NaN: its tail maximum is not finite
        if bool(small.any()):
            # The tail lies far below the top-K (a sharp policy): weigh it from its own maximum, exactly, and
            # carry the scale exp(tail max - row max) in float64, where it does not underflow before ~700 nats.
            rows = small.nonzero().squeeze(1)
            tail_logits = s[rows].scatter(1, top[rows], float("-inf"))
            tail_max = tail_logits.amax(dim=1, keepdim=True)
            if not bool(torch.isfinite(tail_max).all()):  # K = N (nothing in the tail), or NaN logits
                return None
            e[rows] = _exp_or_zero(tail_logits - tail_max)
            tail[rows] = e[rows].sum(dim=1)
            e_scale = torch.ones(s.shape[0], dtype=torch.float64)
            e_scale[rows] = (tail_max - row_max[rows]).squeeze(1).double().exp()
        tail = tail.double() if e_scale is None else tail.double() * e_scale  # T / row maximum, float64
    return _ApproxInclusion.apply(s, top, items, e, tail, e_scale, log_p)
