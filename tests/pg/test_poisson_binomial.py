"""The truncated Poisson-binomial CDF: the fused CPU kernel agrees with the torch DP, values and gradients,
and inclusion_prob_exact gives the same answer on either path."""

from __future__ import annotations

import pytest
import torch

from rag_capg.pg import poisson_binomial as pb
from rag_capg.pg.inclusion import inclusion_prob_exact, log_inclusion_prob

needs_numba = pytest.mark.skipif(not pb._HAVE_NUMBA, reason="numba is not installed")


def brute_force_cdf(q: torch.Tensor, state0: torch.Tensor) -> torch.Tensor:
    """Prob[count <= K-1] by summing over every success pattern of the M items (small M only)."""
    M, X = q.shape
    K = state0.shape[0]
    total = torch.zeros(X, dtype=q.dtype)
    for pattern in range(2 ** M):
        bits = torch.tensor([(pattern >> j) & 1 for j in range(M)], dtype=torch.bool)
        prob = torch.where(bits[:, None], 1 - q, q).prod(dim=0)
        hits = int(bits.sum())
        for c in range(K - hits):
            total += prob * state0[c]
    return total


def random_inputs(M=6, K=4, X=5, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    log_q = -torch.rand(M, X, generator=g, dtype=torch.float64) * torch.logspace(-6, 2, X, dtype=torch.float64)
    state0 = torch.rand(K, X, generator=g, dtype=torch.float64)
    state0 = state0 / state0.sum(0) * 0.9  # a (sub-)distribution over 0..K-1
    return log_q.requires_grad_(requires_grad), state0.requires_grad_(requires_grad)


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_matches_brute_force(path, monkeypatch):
    if path == "kernel" and not pb._HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("RAG_CAPG_NO_NUMBA", "1" if path == "torch" else "0")
    log_q, state0 = random_inputs(requires_grad=False)
    got = pb.truncated_cdf(log_q, state0)
    assert torch.allclose(got, brute_force_cdf(log_q.exp(), state0), rtol=1e-12, atol=1e-15)


@needs_numba
@pytest.mark.parametrize("K", [1, 2, 5])
def test_kernel_gradients_match_torch_autograd(K, monkeypatch):
    log_q, state0 = random_inputs(M=9, K=K, X=70, seed=K)  # X > the kernel's block: two blocks, one partial
    weight = torch.linspace(0.5, 1.5, 70, dtype=torch.float64)
    grads = []
    for flag in ("0", "1"):
        monkeypatch.setenv("RAG_CAPG_NO_NUMBA", flag)
        a, b = log_q.detach().clone().requires_grad_(), state0.detach().clone().requires_grad_()
        out = pb.truncated_cdf(a, b)
        (out * weight).sum().backward()
        grads.append((out.detach(), a.grad, b.grad))
    for kernel, reference in zip(*grads):
        assert torch.allclose(kernel, reference, rtol=1e-11, atol=1e-15)


@needs_numba
def test_kernel_passes_gradcheck():
    log_q, state0 = random_inputs(M=4, K=3, X=3)
    assert torch.autograd.gradcheck(pb.truncated_cdf, (log_q, state0))
    r = torch.rand(4, 2, dtype=torch.float64).requires_grad_()
    log_v = torch.linspace(0.1, 0.9, 3, dtype=torch.float64).log()
    state = torch.rand(3, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda r_, s_: pb.race_truncated_cdf(r_, log_v, s_), (r, state))


def test_race_form_equals_the_general_form():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(7, 3, generator=g, dtype=torch.float64) * 4
    log_v = torch.linspace(0.05, 0.95, 5, dtype=torch.float64).log()
    state = torch.rand(4, 15, generator=g, dtype=torch.float64)
    log_q = (r[:, :, None] * log_v).reshape(7, 15)
    assert torch.allclose(pb.race_truncated_cdf(r, log_v, state), pb.truncated_cdf(log_q, state), rtol=1e-13)


def test_without_gradient_the_values_are_unchanged():
    log_q, state0 = random_inputs()
    with_grad = pb.truncated_cdf(log_q, state0)
    with torch.no_grad():
        without = pb.truncated_cdf(log_q, state0)
    assert torch.equal(with_grad.detach(), without)


def test_tiny_failure_probabilities_keep_their_relative_accuracy():
    """q = exp(log q) exactly: a CDF of 1e-200 comes out with full relative precision."""
    log_q = torch.full((3, 1), -230.0, dtype=torch.float64)  # q = e^-230 ~ 1e-100: items all but surely succeed
    state0 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)  # K = 2: at most one success allowed
    # Prob[count <= 1] = q^3 + 3 q^2 (1 - q) = 3 q^2 to double precision
    expected = 3 * torch.exp(torch.tensor([-460.0], dtype=torch.float64))
    assert torch.allclose(pb.truncated_cdf(log_q, state0), expected, rtol=1e-12)


@needs_numba
@pytest.mark.parametrize("tail", ["exact", "linear"])
@pytest.mark.parametrize("top_m", [None, 24])
def test_inclusion_prob_exact_is_the_same_on_both_paths(tail, top_m, monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits = 2.0 * torch.randn(4, 60, generator=g, dtype=torch.float64)
    logits[0, :5] = float("-inf")  # weightless items
    items = torch.stack([torch.randperm(55, generator=g)[:3] + 5 for _ in range(4)])  # any rank, tiny P too
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("RAG_CAPG_NO_NUMBA", flag)
        x = logits.clone().requires_grad_()
        lp = log_inclusion_prob(x, items, 8, method="exact", top_m=top_m, tail=tail)
        lp.sum().backward()
        out.append((lp.detach(), x.grad))
    (lp_kernel, g_kernel), (lp_torch, g_torch) = out
    assert torch.allclose(lp_kernel, lp_torch, rtol=1e-10, atol=1e-12)
    finite = torch.isfinite(logits)
    assert torch.allclose(g_kernel[finite], g_torch[finite], rtol=1e-8, atol=1e-10)
    assert bool((inclusion_prob_exact(logits, items, 8, top_m=top_m, tail=tail) > 0).all())
