"""Truncated Poisson-binomial CDF, Prob[count <= K-1], differentiable, for the exact inclusion probability.

Items j = 1..M succeed independently with probability p_j = 1 - q_j; the count starts from an initial
distribution ``state0`` over 0..K-1 (one-hot at 0, or the Poisson tail term of ``inclusion``). The DP
over items keeps Prob[count = c] for c < K only, since we need nothing above K-1:

    S_{j+1}[c] = q_j S_j[c] + p_j S_j[c-1]          (S_j[-1] = 0; mass pushed past K-1 is dropped)
    F = sum_c S_M[c].

Every term is a product of non-negative numbers, so the recurrence has no cancellation; q_j is taken as
exp(log q_j), exact even when p_j rounds to 1. (This is the former ``torch.lerp(S, shift(S), p)`` with q
and p kept apart: the results agree to float64 round-off, better where q_j is tiny.) The CPU kernel
takes p_j = 1 - q_j rather than -expm1(log q_j) (torch's expm1 is not vectorised and cost as much as the
DP). That loses nothing: 1 - q is exact for q >= 1/2 (Sterbenz) and within half an ulp below, so p_j is
off only by q_j's own rounding, |d| <= eps q_j / 2; and as G (below) is non-increasing in c, an error d
in p_j changes F by |d| |G_{j+1}.(shift(S_j) - S_j)| <= |d| G_{j+1}.S_j <= |d| F / q_j <= eps F / 2,
a relative error of eps / 2 per item however small p_j is.

Gradient by the adjoint of the recurrence. With G_j = dF/dS_j (so G_M = 1), one step back is

    G_j[c] = q_j G_{j+1}[c] + p_j G_{j+1}[c+1]      (G_{j+1}[K] = 0),

i.e. G_j[c] = Prob[items j..M add at most K-1-c], and since dq_j/dlog q_j = q_j = -dp_j/dlog q_j,

    dF/dlog q_j = q_j sum_c G_{j+1}[c] (S_j[c] - S_j[c-1]),      dF/dstate0 = G_0.

Two implementations of the same arithmetic:
  * on CPU, a fused numba kernel computes F and both
    derivatives in one pass over each block of columns, with the M x K prefix states kept in cache;
    backward only scales the stored derivatives by the incoming gradient. Autograd through the torch
    recurrence costs ~10 tensor ops per item and per direction (M = 64: ~1,300 ops a step);
  * anywhere else (CUDA) or if numba is missing, the torch recurrence below, under autograd.
``race_truncated_cdf`` is the exponential race's special case log q_j = r_j log v_n (relative weight r_j,
quadrature node v_n): it builds log q itself and hands back dF/dr directly.
``RAG_CAPG_NO_NUMBA=1`` forces the torch path, here and in ``inclusion.inclusion_prob_exact`` (the tests
compare the two).
"""

from __future__ import annotations

import os

import torch

__all__ = ["truncated_cdf", "race_truncated_cdf", "truncated_cdf_torch"]

try:  # pragma: no cover - exercised whenever numba imports
    import numba
    import numpy as np

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

# The exponential race's time scale (``inclusion._time_scale``), shared by its torch and numba implementations.
NEWTON_STEPS = 5  # on the expected number of arrivals: a scale, not a root (4 steps were as accurate as 8)
TARGET_TIME = 1.0  # a pick's time scale lands at x = -log v = 1, where the fixed quadrature resolves best
MAX_SERIES_ARG = 40.0  # and no further than 2 rho x = 40 in the numba tail's series (terms grow like e^(2 rho x))

_BLOCK = 64  # columns per block: the (M+1, K, block) prefix states (665 KB at M=64, K=20) stay in L2


def truncated_cdf_torch(log_q: torch.Tensor, state0: torch.Tensor) -> torch.Tensor:
    """Reference DP in torch ops (any device, autograd). log_q (M, X), state0 (K, X) -> F (X,)."""
    q, p = log_q.exp(), -torch.expm1(log_q)
    state = state0
    for j in range(log_q.shape[0]):
        moved = p[j] * state[:-1]  # mass moving from count c-1 to c
        state = q[j] * state
        state = torch.cat((state[:1], state[1:] + moved))
    return state.sum(dim=0)


if _HAVE_NUMBA:

    @numba.njit(cache=True, nogil=True)
    def _kernel(q_all, col_scale, state0, out, d_log_q, d_state0, need_grad):  # pragma: no cover - compiled
        """q_all = exp(log q) (M, X); writes F (X,) and, if need_grad, col_scale[x] * dF/dlog q (M, X) and
        dF/dstate0 (K, X). Columns in blocks of _BLOCK, innermost (vectorised); each block's q, p are
        copied into local arrays first, which lets LLVM vectorise the loops."""
        M, X = q_all.shape
        K = state0.shape[0]
        S = np.empty((M + 1, K, _BLOCK))
        q = np.empty((M, _BLOCK))
        p = np.empty((M, _BLOCK))
        G = np.empty((K, _BLOCK))
        acc = np.empty(_BLOCK)
        for x0 in range(0, X, _BLOCK):
            n = min(_BLOCK, X - x0)
            for j in range(M):
                for t in range(n):
                    q[j, t] = q_all[j, x0 + t]
                    p[j, t] = 1.0 - q[j, t]  # see the module docstring: as good as -expm1(log q) here
            for c in range(K):
                for t in range(n):
                    S[0, c, t] = state0[c, x0 + t]
            for j in range(M):  # forward: prefix distributions S_1..S_M
                for t in range(n):
                    S[j + 1, 0, t] = q[j, t] * S[j, 0, t]
                for c in range(1, K):
                    for t in range(n):
                        S[j + 1, c, t] = q[j, t] * S[j, c, t] + p[j, t] * S[j, c - 1, t]
            for t in range(n):
                total = 0.0
                for c in range(K):
                    total += S[M, c, t]
                out[x0 + t] = total
            if not need_grad:
                continue
            for c in range(K):
                for t in range(n):
                    G[c, t] = 1.0
            for j in range(M - 1, -1, -1):  # adjoint: G = dF/dS_{j+1} on entry, dF/dS_j on exit
                for t in range(n):
                    acc[t] = G[0, t] * S[j, 0, t]
                for c in range(1, K):
                    for t in range(n):
                        acc[t] += G[c, t] * (S[j, c, t] - S[j, c - 1, t])
                for t in range(n):
                    d_log_q[j, x0 + t] = col_scale[x0 + t] * q[j, t] * acc[t]
                for c in range(K - 1):
                    for t in range(n):
                        G[c, t] = q[j, t] * G[c, t] + p[j, t] * G[c + 1, t]
                for t in range(n):
                    G[K - 1, t] = q[j, t] * G[K - 1, t]
            for c in range(K):
                for t in range(n):
                    d_state0[c, x0 + t] = G[c, t]


def _run_kernel(log_q: torch.Tensor, state0: torch.Tensor, need_grad: bool, col_scale: torch.Tensor | None = None):
    """F, col_scale * dF/dlog q, dF/dstate0 (the last two None unless need_grad) from one kernel call."""
    q = log_q.exp().contiguous()  # vectorised by torch; numba would call scalar libm
    X = q.shape[1]
    s0 = state0.contiguous().numpy()
    scale = np.ones(X) if col_scale is None else col_scale.contiguous().numpy()
    out = np.empty(X)
    d_log_q = np.empty(q.shape) if need_grad else np.empty((0, 0))
    d_state0 = np.empty_like(s0) if need_grad else np.empty((0, 0))
    _kernel(q.numpy(), scale, s0, out, d_log_q, d_state0, need_grad)
    if not need_grad:
        return torch.from_numpy(out), None, None
    return torch.from_numpy(out), torch.from_numpy(d_log_q), torch.from_numpy(d_state0)


class _FusedTruncatedCDF(torch.autograd.Function):
    """F and its derivatives from one kernel call; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, log_q: torch.Tensor, state0: torch.Tensor, need_grad: bool) -> torch.Tensor:
        out, d_log_q, d_state0 = _run_kernel(log_q.detach(), state0.detach(), need_grad)
        ctx.save_for_backward(d_log_q, d_state0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        d_log_q, d_state0 = ctx.saved_tensors
        return grad_out * d_log_q, grad_out * d_state0, None


class _FusedRaceCDF(torch.autograd.Function):
    """The same with log q_j = r_j log v_n: the (M, Y*n) log q is built inside, the kernel returns
    dF/dr_j at every node (dlog q / dr = log v), and backward contracts it with the incoming gradient
    over the nodes (one einsum), never forming the (M, Y, n) gradient of log q in autograd."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, log_v: torch.Tensor, state0: torch.Tensor, need_grad: bool) -> torch.Tensor:
        M, Y = r.shape
        n = log_v.shape[0]
        log_q = (r.detach().contiguous()[:, :, None] * log_v).view(M, Y * n)
        out, d_r_nodes, d_state0 = _run_kernel(log_q, state0.detach(), need_grad, col_scale=log_v.repeat(Y))
        ctx.save_for_backward(d_r_nodes, d_state0)
        ctx.shape = (M, Y, n)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        d_r_nodes, d_state0 = ctx.saved_tensors
        M, Y, n = ctx.shape
        grad_r = torch.einsum("jyn,yn->jy", d_r_nodes.view(M, Y, n), grad_out.view(Y, n))
        return grad_r, None, grad_out * d_state0, None


def kernels_enabled() -> bool:
    """Whether the numba kernels may run: numba imports and ``RAG_CAPG_NO_NUMBA`` is unset or 0."""
    return _HAVE_NUMBA and os.environ.get("RAG_CAPG_NO_NUMBA", "") in ("", "0")


def _use_kernel(*tensors: torch.Tensor) -> bool:
    return kernels_enabled() and all(t.device.type == "cpu" and t.dtype == torch.float64 for t in tensors)


def _need_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def truncated_cdf(log_q: torch.Tensor, state0: torch.Tensor) -> torch.Tensor:
    """Prob[count <= K-1] per column. log_q (M, X): log failure probability of each item; state0 (K, X):
    initial distribution of the count. Returns (X,), differentiable w.r.t. both inputs."""
    if log_q.dim() != 2 or state0.dim() != 2 or log_q.shape[1] != state0.shape[1]:
        raise ValueError(f"need log_q (M, X) and state0 (K, X), got {tuple(log_q.shape)}, {tuple(state0.shape)}")
    if _use_kernel(log_q, state0):
        return _FusedTruncatedCDF.apply(log_q, state0, _need_grad(log_q, state0))
    return truncated_cdf_torch(log_q, state0)


def race_truncated_cdf(r: torch.Tensor, log_v: torch.Tensor, state0: torch.Tensor) -> torch.Tensor:
    """``truncated_cdf`` with log q_j = r_j * log v_n at every node n (the exponential race of
    ``inclusion``). r (M, Y) relative weights, log_v (n,) log of the nodes (constant), state0 (K, Y*n) with
    columns ordered (y, node). Returns (Y*n,), differentiable w.r.t. r and state0."""
    if r.dim() != 2 or log_v.dim() != 1 or state0.dim() != 2 or state0.shape[1] != r.shape[1] * log_v.shape[0]:
        raise ValueError(f"need r (M, Y), log_v (n,), state0 (K, Y*n), got {tuple(r.shape)}, "
                         f"{tuple(log_v.shape)}, {tuple(state0.shape)}")
    if log_v.requires_grad:
        raise ValueError("log_v (the quadrature nodes) must be a constant")
    if _use_kernel(r, log_v, state0):
        return _FusedRaceCDF.apply(r, log_v, state0, _need_grad(r, state0))
    return truncated_cdf_torch((r[:, :, None] * log_v).reshape(r.shape[0], -1), state0)
