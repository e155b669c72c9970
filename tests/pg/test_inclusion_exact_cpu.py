"""The fused CPU node for CA-PG-exact equals the torch expression (values and gradients), and its pieces are right.

The reference is ``inclusion._exact_torch``: the same maths in plain torch under autograd, whose tail sums
p_j(v) over every tail item and node directly (no power series). ``inclusion_prob_exact`` itself is checked
against enumeration and Monte-Carlo in tests/test_inclusion.py; the second-order tail start here against
the exact Poisson-binomial.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rag_capg.pg import inclusion
from rag_capg.pg.inclusion import _exact_torch, _quadrature_01, _tail_start, inclusion_prob_exact
from rag_capg.pg.inclusion_exact_cpu import exact_inclusion_cpu
from rag_capg.pg.top_k import top_k_indices


def both(s: torch.Tensor, items: torch.Tensor, k: int, top_m: int | None, nodes: int, weights: torch.Tensor):
    """(P, gradient of sum(weights * log P)) by the fused node and by the torch reference."""
    n_all = s.shape[1]
    top = top_k_indices(s, top_m + 1 if top_m is not None and top_m + 1 < n_all else n_all)
    log_v, w = (torch.as_tensor(a) for a in _quadrature_01(nodes))
    log_v = log_v.log()
    out = []
    for fused in (True, False):
        x = s.clone().requires_grad_(True)
        if fused:
            p = exact_inclusion_cpu(x, top, items, k, log_v, w)
            assert p is not None
        else:
            p = _exact_torch(x.double(), items, k, top, log_v, w, "exact" if top.shape[1] < n_all else None)
        (grad,) = torch.autograd.grad((weights * p.clamp_min(1e-300).log()).sum(), x)
        out.append((p.detach(), grad))
    return out


def benchmark_logits(rows: int, n: int, scale: float, seed: int) -> torch.Tensor:
    """Logits of the synthetic benchmark's two-tower ESR (10-dim unit-variance embeddings) times a scale."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 10, generator=g) @ torch.randn(n, 10, generator=g).T * scale).double()


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])  # flat (long series) .. sharp (tail far below)
@pytest.mark.parametrize("k, top_m, num_picks, nodes", [(20, 23, 1, 20), (20, 40, 3, 32), (5, 5, 2, 16),
                                                        (1, 3, 2, 13), (8, None, 2, 24), (20, 23, 2, 128)])
def test_fused_equals_the_torch_reference(scale, k, top_m, num_picks, nodes):
    n = 60 if top_m is None else 400
    s = benchmark_logits(6, n, scale, seed=k + num_picks)
    g = torch.Generator().manual_seed(1)
    top = top_k_indices(s, k + 3)
    # picks at the top, around the K-th, and far below (in the tail), several per row
    items = torch.where(torch.rand(6, num_picks, generator=g) < 0.5,
                        top.gather(1, torch.randint(0, k + 3, (6, num_picks), generator=g)),
                        torch.randint(0, n, (6, num_picks), generator=g))
    items[0, 0] = s[0].argmin()
    weights = torch.rand(6, num_picks, generator=g, dtype=torch.float64)
    (p_fused, g_fused), (p_ref, g_ref) = both(s, items, k, top_m, nodes, weights)
    torch.testing.assert_close(p_fused, p_ref, atol=1e-13, rtol=1e-11)
    torch.testing.assert_close(g_fused, g_ref, atol=1e-12, rtol=1e-10)


def test_float32_logits_get_a_float32_gradient_close_to_float64():
    s64 = benchmark_logits(4, 300, 1.0, seed=0)
    items = top_k_indices(s64, 30)[:, [0, 12, 29]]
    (p64, g64), _ = both(s64, items, 20, 23, 20, torch.ones(4, 3, dtype=torch.float64))
    (p32, g32), _ = both(s64.float(), items, 20, 23, 20, torch.ones(4, 3, dtype=torch.float64))
    assert g32.dtype == torch.float32
    torch.testing.assert_close(p32, p64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g32.double(), g64, atol=1e-4, rtol=1e-4)


def test_gradcheck_on_a_small_row_with_a_tail():
    s = benchmark_logits(2, 40, 1.0, seed=3)
    items = torch.tensor([[0, 17], [5, 39]])
    log_v, w = (torch.as_tensor(a) for a in _quadrature_01(12))
    log_v = log_v.log()
    top = top_k_indices(s, 9)
    assert torch.autograd.gradcheck(lambda x: exact_inclusion_cpu(x, top, items, 5, log_v, w),
                                    (s.clone().requires_grad_(True),))


def test_non_finite_rows_fall_back_to_the_torch_path(monkeypatch):
    s = benchmark_logits(2, 50, 1.0, seed=4)
    s[1, 8:] = float("-inf")  # fewer than K + 1 items of positive weight: s_ref is -inf for a low pick
    items = torch.tensor([[3], [20]])
    top = top_k_indices(s, 12)
    log_v, w = (torch.as_tensor(a) for a in _quadrature_01(16))
    assert exact_inclusion_cpu(s, top, items, 10, log_v.log(), w) is None
    # the public function then takes the torch path: same answer with the kernels switched off
    got = inclusion_prob_exact(s, items, 10, top_m=11)
    monkeypatch.setenv("RAG_CAPG_NO_NUMBA", "1")
    torch.testing.assert_close(got, inclusion_prob_exact(s, items, 10, top_m=11), equal_nan=True)


def test_a_weightless_pick_has_probability_zero_and_a_finite_gradient():
    s = benchmark_logits(2, 80, 1.0, seed=7)
    s[:, 70:] = float("-inf")  # masked items: never drawn, but a caller may still ask about one
    items = torch.tensor([[75, 3], [0, 79]])
    x = s.clone().requires_grad_(True)
    p = inclusion_prob_exact(x, items, 10, num_nodes=16, top_m=23)
    (grad,) = torch.autograd.grad(p.sum(), x)
    assert p[0, 0] == 0 and p[1, 1] == 0 and p[0, 1] > 0 and p[1, 0] > 0
    assert bool(torch.isfinite(grad).all())
    (_, g_fused), (_, g_ref) = both(s, torch.tensor([[3], [0]]), 10, 23, 16, torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(g_fused[:, :70], g_ref[:, :70], atol=1e-12, rtol=1e-10)


def test_a_weightless_tail_bound_gives_the_torch_answer_not_nan(monkeypatch):
    # fewer than top_m + 1 items of positive weight: the M-th kept logit is -inf, and so is its whole tail
    s = torch.randn(1, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s[0, 15:] = float("-inf")
    items = torch.tensor([[0, 3]])
    x = s.clone().requires_grad_(True)
    p = inclusion_prob_exact(x, items, 5, num_nodes=16, top_m=23)
    (grad,) = torch.autograd.grad(p.sum(), x)
    monkeypatch.setenv("RAG_CAPG_NO_NUMBA", "1")
    y = s.clone().requires_grad_(True)
    p_ref = inclusion_prob_exact(y, items, 5, num_nodes=16, top_m=23)
    (grad_ref,) = torch.autograd.grad(p_ref.sum(), y)
    torch.testing.assert_close(p, p_ref, atol=1e-13, rtol=1e-11)
    torch.testing.assert_close(grad[:, :15], grad_ref[:, :15], atol=1e-12, rtol=1e-10)


def test_no_gradient_through_an_item_hundreds_of_nats_above_the_scale():
    # q = v^r underflows to 0 for such an item; flooring it at e^-700 instead left dq/dlog q = e^-700 times
    # r ~ e^700 in the adjoint: an O(1) gradient where the true one is 0
    s = torch.randn(1, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s[0, 0] = 700.0
    (p_fused, g_fused), (p_ref, g_ref) = both(s, torch.tensor([[5]]), 5, 10, 16, torch.ones(1, 1, dtype=torch.float64))
    torch.testing.assert_close(p_fused, p_ref, atol=1e-13, rtol=1e-11)
    assert g_fused[0, 0] == 0 and g_ref[0, 0] == 0
    torch.testing.assert_close(g_fused, g_ref, atol=1e-12, rtol=1e-10)


def exact_poisson_binomial(p: torch.Tensor, k: int) -> torch.Tensor:
    """Prob[count = c], c < k, of independent Bernoulli(p_j), by enumerating every outcome."""
    out = torch.zeros(k, dtype=torch.float64)
    for bits in itertools.product((0, 1), repeat=p.shape[0]):
        b = torch.tensor(bits, dtype=torch.bool)
        if int(b.sum()) < k:
            out[int(b.sum())] += float(torch.where(b, p, 1 - p).prod())
    return out


def test_second_order_tail_start_beats_poisson_and_is_poisson_without_s2():
    g = torch.Generator().manual_seed(5)
    k = 6
    for _ in range(5):
        p = 0.3 * torch.rand(12, generator=g, dtype=torch.float64)
        lam, s2 = p.sum().reshape(1), p.square().sum().reshape(1)
        want = exact_poisson_binomial(p, k)
        second = _tail_start(lam, s2, k)[:, 0]
        poisson = _tail_start(lam, torch.zeros(1, dtype=torch.float64), k)[:, 0]
        c = torch.arange(k, dtype=torch.float64)
        torch.testing.assert_close(poisson, torch.exp(c * lam.log() - lam - torch.lgamma(c + 1)))
        err2, err1 = float((second - want).abs().sum()), float((poisson - want).abs().sum())
        assert err1 <= 2 * float(s2)  # Le Cam: total variation <= sum p^2
        assert err2 < float(p.pow(3).sum()) and err2 < err1 / 3  # second order: O(sum p^3)


def test_the_quadrature_handles_the_integrand_near_zero_better_than_plain_gauss_legendre():
    """c v^(c-1) v^R, closed form c / (c + R): non-integer powers near v = 0 are what the race integrand
    looks like there. The v = y^(3/2) map gives up a little on smooth ones (the constant: ~2e-5 at 20 nodes)
    for much less error on the worst."""
    cases = [(1.0, 0.0), (0.3, 1.0), (0.05, 2.7), (1.0, 6.3), (0.1, 0.5), (0.02, 30.0)]
    x, w_gl = np.polynomial.legendre.leggauss(20)
    plain = ((x + 1) / 2, w_gl / 2)

    def worst(rule):
        v, w = rule
        return max(abs(float((w * c * v ** (c - 1) * v ** r).sum()) - c / (c + r)) for c, r in cases)

    assert worst(_quadrature_01(20)) < 1e-4 < 1e-3 < worst(plain)
    assert worst(_quadrature_01(32)) < worst(_quadrature_01(20)) / 2  # and it converges


def test_kernels_switch_off_with_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(inclusion, "exact_inclusion_cpu", lambda *a: calls.append(1))
    s = benchmark_logits(1, 50, 1.0, seed=6)
    monkeypatch.setenv("RAG_CAPG_NO_NUMBA", "1")
    inclusion_prob_exact(s, torch.tensor([[2]]), 5, top_m=9)
    assert not calls
    monkeypatch.setenv("RAG_CAPG_NO_NUMBA", "0")
    inclusion_prob_exact(s, torch.tensor([[2]]), 5, top_m=9)  # the stub returns None: the torch path answers
    assert calls
