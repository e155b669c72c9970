"""Inclusion probabilities P(a in S_K) against brute force.

* exact (exponential race + quadrature): against the sum of PL probabilities of every ordered list that
  contains a (small N, all K), converging as the nodes grow; against Monte-Carlo Gumbel-top-K
  frequencies at N=200, K=20 for items across ranks, with and without the top-M + tail shortcut;
  gradients against finite differences and against the gradient of the enumeration.
* approx (the paper's top-prefix form): against a naive re-implementation of its formula, equal to the
  softmax at K=1, and clearly above the truth for a mid-ranked item (its documented bias).
* log_inclusion_prob, batch rows vs single rows, float32 / float64 / half inputs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rag_capg.pg.inclusion import inclusion_prob_approx, inclusion_prob_exact, log_inclusion_prob
from rag_capg.pg.policy import sample_plackett_luce
from tests.pg.reference import naive_pl_prob

MC_N, MC_K, MC_SAMPLES = 200, 20, 200_000
MC_RANKS = [0, 3, 10, 19, 20, 30, 60, 120, 199]  # top, mid (around K), low


def enumerated_inclusion(logits: torch.Tensor, k: int) -> torch.Tensor:
    """P(a in S_k) for every item a: sum of pi(S) over all ordered k-lists S containing a. (N,)"""
    n = logits.shape[0]
    probs = [torch.zeros((), dtype=logits.dtype) for _ in range(n)]
    for ordered_list in itertools.permutations(range(n), k):
        p = naive_pl_prob(logits, ordered_list)
        for a in ordered_list:
            probs[a] = probs[a] + p
    return torch.stack(probs)


def approx_step_shares(logits: list[float], a: int, k: int) -> list[float]:
    """The paper's p_k(a) = w_a / (sum_j w_j - sum_{j<k} w_{b_j}), b = the top-(k-1) others by logit,
    with each denominator summed over the remaining items (no cancellation)."""
    w = [math.exp(x) for x in logits]
    prefix = sorted((j for j in range(len(w)) if j != a), key=lambda j: -logits[j])[:k - 1]
    return [w[a] / sum(w[j] for j in range(len(w)) if j not in prefix[:step]) for step in range(k)]


def naive_approx(logits: list[float], a: int, k: int) -> float:
    """1 - prod_k (1 - p_k(a))."""
    return 1.0 - math.prod(1.0 - p for p in approx_step_shares(logits, a, k))


def mc_logits() -> torch.Tensor:
    """N=200 logits with a spread of ~2 nats per standard deviation: a mid-ranked item has P ~ 0.35."""
    return torch.randn(1, MC_N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0


def items_at_ranks(logits: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    return logits[0].argsort(descending=True)[ranks][None]


@pytest.fixture(scope="module")
def gumbel_top_k_frequencies() -> torch.Tensor:
    """Fraction of MC_SAMPLES Gumbel-top-K lists (the policy's sampler) that contain each item. (N,)"""
    s = mc_logits().float()
    counts = torch.zeros(MC_N, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    chunk = 50_000
    for _ in range(MC_SAMPLES // chunk):
        lists = sample_plackett_luce(s.expand(chunk, MC_N), MC_K, generator=g)
        counts += torch.bincount(lists.reshape(-1), minlength=MC_N).double()
    return counts / MC_SAMPLES


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 4.0])
def test_exact_equals_enumeration_and_converges_with_the_nodes(scale):
    s = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale
    items = torch.arange(6)[None]
    for k in range(1, 6):
        want = enumerated_inclusion(s, k)
        assert abs(float(want.sum()) - k) < 1e-12  # every list holds k items
        # Gauss-Legendre converges algebraically here (v^(c-1) and v^(r_j), r_j < 1, are not smooth at
        # v = 0): ~1e-4 at 32 nodes as documented, and a formula error would not shrink with the nodes.
        for nodes, tol in [(32, 1e-4), (64, 2e-5), (256, 1e-6)]:
            got = inclusion_prob_exact(s[None], items, k, num_nodes=nodes)[0]
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert torch.equal(inclusion_prob_exact(s[None], items, 6), torch.ones(1, 6, dtype=torch.float64))


@pytest.mark.parametrize("top_m, tail", [(None, "exact"), (23, "exact"), (64, "exact"), (64, "linear"),
                                         (MC_K, "exact")])
def test_exact_matches_gumbel_top_k_frequencies(gumbel_top_k_frequencies, top_m, tail):
    s = mc_logits()
    items = items_at_ranks(s, MC_RANKS)
    got = inclusion_prob_exact(s, items, MC_K, top_m=top_m, tail=tail)[0]
    freq = gumbel_top_k_frequencies[items[0]]
    # binomial standard error <= sqrt(0.25 / 200k) = 0.0011, so 0.005 is > 4.5 standard errors
    torch.testing.assert_close(got, freq, atol=5e-3, rtol=0)
    assert freq[0] > 0.99 and 0.2 < freq[3] < 0.6 and freq[-1] < 0.01  # the ranks span the range


def test_exact_over_all_items_sums_to_k_and_tracks_monte_carlo(gumbel_top_k_frequencies):
    s = mc_logits()
    got = inclusion_prob_exact(s, torch.arange(MC_N)[None], MC_K, top_m=64)[0]
    assert abs(float(got.sum()) - MC_K) < 0.01
    assert float((got - gumbel_top_k_frequencies).abs().max()) < 5e-3


def _central_difference_jacobian(s: torch.Tensor, items: torch.Tensor, k: int, nodes: int) -> torch.Tensor:
    """d P(items[i] in S) / d s_j by central differences (h = 1e-5, O(h^2) error), (L, N)."""
    h, n = 1e-5, s.shape[0]
    columns = []
    for j in range(n):
        e = torch.zeros(1, n, dtype=torch.float64)
        e[0, j] = h
        columns.append((inclusion_prob_exact(s[None] + e, items, k, num_nodes=nodes)
                        - inclusion_prob_exact(s[None] - e, items, k, num_nodes=nodes))[0] / (2 * h))
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_exact_gradient_matches_finite_differences_and_the_enumeration(scale):
    s = torch.tensor([1.2, 0.3, -0.5, 0.0, -1.4, 0.8], dtype=torch.float64) * scale
    items = torch.arange(6)[None]
    for k in (1, 2, 3, 4):
        s_enum = s.clone().requires_grad_(True)
        enumerated = enumerated_inclusion(s_enum, k)
        want = torch.stack([torch.autograd.grad(enumerated[i], s_enum, retain_graph=True)[0] for i in range(6)])
        # The gradient carries the quadrature's error too: <= ~1.5e-4 at 64 nodes, ~1e-5 at 256 (and the
        # scale w_ref is held fixed by autograd, while finite differences move it: the integral does
        # not depend on it, the quadrature slightly does).
        for nodes, tol in [(64, 3e-4), (256, 2e-5)]:
            x = s[None].clone().requires_grad_(True)
            p = inclusion_prob_exact(x, items, k, num_nodes=nodes)[0]
            grad = torch.stack([torch.autograd.grad(p[i], x, retain_graph=True)[0][0] for i in range(6)])
            torch.testing.assert_close(grad, want, atol=tol, rtol=0)
            torch.testing.assert_close(grad, _central_difference_jacobian(s, items, k, nodes), atol=tol, rtol=0)
            # P is invariant to adding a constant to every logit: each gradient sums to 0 (up to the same error)
            assert float(grad.sum(dim=1).abs().max()) < tol


@pytest.mark.parametrize("top_m, tail", [(None, "exact"), (23, "exact"), (64, "exact"), (64, "linear")])
def test_exact_directional_derivative_at_n200_matches_finite_differences(top_m, tail):
    # One random direction instead of 200 coordinates: d/dt P(s + t u) at t = 0 against central
    # differences of the same function. The tail items alone contribute 3e-3..4e-2 to these derivatives.
    s = mc_logits()
    u = torch.randn(1, MC_N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    items = items_at_ranks(s, [0, 10, 19, 30, 120])
    x = s.clone().requires_grad_(True)
    p = inclusion_prob_exact(x, items, MC_K, num_nodes=64, top_m=top_m, tail=tail)
    h = 1e-6
    fd = (inclusion_prob_exact(s + h * u, items, MC_K, num_nodes=64, top_m=top_m, tail=tail)
          - inclusion_prob_exact(s - h * u, items, MC_K, num_nodes=64, top_m=top_m, tail=tail))[0] / (2 * h)
    ad = torch.stack([(torch.autograd.grad(p[0, i], x, retain_graph=True)[0] * u).sum() for i in range(5)])
    # the top item (all others lighter, so w_ref = w_a, held fixed by autograd) carries the quadrature's
    # sensitivity to w_ref, ~1e-4 at 64 nodes; the others agree to finite-difference accuracy
    assert abs(float(ad[0] - fd[0])) < 3e-4
    torch.testing.assert_close(ad[1:], fd[1:], atol=1e-8, rtol=0)


def test_approx_equals_its_formula_computed_naively():
    s = torch.randn(1, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.5
    items = torch.arange(10)[None]  # inside and outside the top-K
    for k in (1, 2, 4, 9):
        want = torch.tensor([naive_approx(s[0].tolist(), a, k) for a in range(10)], dtype=torch.float64)
        torch.testing.assert_close(inclusion_prob_approx(s, items, k)[0], want, atol=1e-12, rtol=0)


def test_approx_is_the_softmax_at_k1():
    s = mc_logits()
    got = inclusion_prob_approx(s, torch.arange(MC_N)[None], 1)
    torch.testing.assert_close(got, torch.softmax(s, dim=1), atol=1e-12, rtol=0)
    # and so is the exact probability (a single draw), to quadrature accuracy
    exact = inclusion_prob_exact(s, torch.arange(MC_N)[None], 1, top_m=64)
    torch.testing.assert_close(exact, torch.softmax(s, dim=1), atol=1e-4, rtol=0)


def test_approx_over_estimates_mid_ranked_items(gumbel_top_k_frequencies):
    # The approximation assumes the K-1 items drawn before a are the heaviest ones, which leaves a the
    # largest possible share at every step: for the item ranked ~K it is clearly too high (here ~0.45
    # against a true ~0.36, like the documented 0.44 vs 0.31).
    s = mc_logits()
    items = items_at_ranks(s, [15, 19, 20, 25])
    approx = inclusion_prob_approx(s, items, MC_K)[0]
    exact = inclusion_prob_exact(s, items, MC_K, top_m=64)[0]
    freq = gumbel_top_k_frequencies[items[0]]
    assert (approx > exact + 0.05).all() and (approx > freq + 0.05).all()


def test_log_inclusion_prob_matches_the_probabilities_and_stays_accurate_when_tiny():
    s = torch.cat([mc_logits()[:, :199], torch.tensor([[-60.0]], dtype=torch.float64)], dim=1)
    items = torch.tensor([[0, 5, 199]])
    for method, fn, opts in (("approx", inclusion_prob_approx, {}), ("exact", inclusion_prob_exact, {"top_m": 64})):
        got = log_inclusion_prob(s, items, 20, method=method, **opts)
        torch.testing.assert_close(got[:, :2], fn(s, items[:, :2], 20, **opts).log(), atol=1e-12, rtol=0)
        assert torch.isfinite(got).all()
        # P ~ 1e-27 is linear in w_a as w_a -> 0: ten nats lower logit, ten nats lower log P
        s_lower = s.clone()
        s_lower[0, 199] = -70.0
        lower = log_inclusion_prob(s_lower, items[:, 2:], 20, method=method, **opts)
        assert abs(float(got[0, 2] - lower[0, 0]) - 10.0) < 1e-6
    # 1 - prod(1 - p_k) is 0 in float64 there, but log P_approx = log sum_k p_k to first order
    log_approx = float(log_inclusion_prob(s, items[:, 2:], 20, method="approx")[0, 0])
    assert math.isclose(log_approx, math.log(sum(approx_step_shares(s[0].tolist(), 199, 20))), abs_tol=1e-9)
    with pytest.raises(ValueError, match="method"):
        log_inclusion_prob(s, items, 20, method="sampled")


def test_batch_rows_equal_rows_one_at_a_time():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(4, MC_N, generator=g, dtype=torch.float64) * 2
    items = torch.stack([torch.randperm(MC_N, generator=g)[:3] for _ in range(4)])
    items[0, 0] = s[0].argmax()  # one pick in the top-M, the rest mostly in the tail
    for fn, opts in [(inclusion_prob_approx, {}), (inclusion_prob_exact, {"top_m": 23, "tail": "exact"}),
                     (inclusion_prob_exact, {"top_m": 64, "tail": "exact"}),
                     (inclusion_prob_exact, {"top_m": 64, "tail": "linear"})]:
        batch = fn(s, items, 10, **opts)
        assert batch.shape == (4, 3)
        single = torch.cat([fn(s[b:b + 1], items[b:b + 1], 10, **opts) for b in range(4)])
        torch.testing.assert_close(batch, single, atol=1e-12, rtol=0)
        # one pick per row (L=1, B>1) must not mix rows either
        one_pick = fn(s, items[:, :1], 10, **opts)
        assert one_pick.shape == (4, 1)
        torch.testing.assert_close(one_pick, single[:, :1], atol=1e-12, rtol=0)


def test_float32_agrees_with_float64_and_half_is_upcast():
    s64 = mc_logits()
    items = items_at_ranks(s64, [0, 10, 19, 60])
    for fn, opts in [(inclusion_prob_approx, {}), (inclusion_prob_exact, {"top_m": 64})]:
        want = fn(s64, items, MC_K, **opts)
        got32 = fn(s64.float(), items, MC_K, **opts)
        assert got32.dtype == torch.float64  # computed and returned in float64 whatever the input
        torch.testing.assert_close(got32, want, atol=1e-5, rtol=0)
        half = s64.half()
        got16 = fn(half, items, MC_K, **opts)
        assert got16.dtype == torch.float64 and torch.isfinite(got16).all()
        torch.testing.assert_close(got16, fn(half.float(), items, MC_K, **opts), atol=0, rtol=0)
    # large logits that overflow exp() in half precision still work
    big = torch.tensor([[12.0, 11.5, 0.0, -3.0]], dtype=torch.float16)
    got = inclusion_prob_exact(big, torch.tensor([[1]]), 1, num_nodes=64)
    assert math.isclose(float(got), float(torch.softmax(big.double(), 1)[0, 1]), abs_tol=1e-6)


def test_invalid_arguments_raise():
    s = torch.zeros(1, 10)
    with pytest.raises(ValueError, match="top_m must be >= k"):
        inclusion_prob_exact(s, torch.tensor([[0]]), 5, top_m=3)
    with pytest.raises(ValueError, match="tail must be"):
        inclusion_prob_exact(s, torch.tensor([[0]]), 2, top_m=4, tail="poisson")
    with pytest.raises(ValueError, match="k must be in"):
        inclusion_prob_approx(s, torch.tensor([[0]]), 11)
    with pytest.raises(ValueError, match="outside"):
        inclusion_prob_exact(s, torch.tensor([[10]]), 2)


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_exact_stays_finite_when_the_top_logit_is_hundreds_of_nats_ahead(kernels, monkeypatch):
    # A policy late in training at a high learning rate: the best item ~720 nats above the rest, where
    # exp(top - tail bound) overflows float64. Its log P is 0 and every gradient must be finite (it was NaN),
    # on the fused CPU node and on the torch path (RAG_CAPG_NO_NUMBA=1).
    monkeypatch.setenv("RAG_CAPG_NO_NUMBA", kernels)
    s = torch.randn(2, 200, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 50
    s[:, 0] = s[:, 1:].max(dim=1).values + 720.0
    items = torch.tensor([[0], [1]])  # the runaway best item, and an ordinary one
    x = s.clone().requires_grad_(True)
    log_p = log_inclusion_prob(x, items, MC_K, method="exact", top_m=64)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    assert torch.isfinite(log_p).all() and torch.isfinite(grad).all()
    assert float(log_p[0, 0].detach()) == 0.0
    # the ordinary pick sees the runaway item as always drawn first, as it already is at 100 nats ahead
    near = s.clone()
    near[:, 0] = s[:, 1:].max(dim=1).values + 100.0
    y = near.requires_grad_(True)
    log_p_near = log_inclusion_prob(y, items, MC_K, method="exact", top_m=64)
    (grad_near,) = torch.autograd.grad(log_p_near.sum(), y)
    torch.testing.assert_close(log_p[1], log_p_near[1].detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(grad[1, 1:], grad_near[1, 1:], atol=1e-10, rtol=0)


@pytest.mark.parametrize("top_m, tail", [(23, "exact"), (23, "linear"), (None, "exact")])
def test_torch_path_in_row_chunks_equals_the_whole_batch_and_keeps_less_for_backward(top_m, tail, monkeypatch):
    # The GPU path (forced here with RAG_CAPG_NO_NUMBA=1) held a float64 (rows, L, N, nodes) tensor for
    # backward: 0.15 GiB at 128 rows and N = 5,183. Split into checkpointed chunks of rows, each row's
    # probability and gradient must be bit for bit those of the row computed alone; against the whole batch
    # in one piece they differ by round-off only (torch's kernels are not bitwise invariant to the batch
    # shape: the unchunked batch differs from its rows one at a time in the last bit too).
    from rag_capg.pg import inclusion

    monkeypatch.setenv("RAG_CAPG_NO_NUMBA", "1")
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, 300, generator=g, dtype=torch.float64) * 2
    items = torch.randint(0, 300, (6, 2), generator=g)
    items[:, 0] = s.argmax(dim=1)  # one pick at the top of its row, one anywhere
    weights = torch.rand(6, 2, generator=g, dtype=torch.float64)

    def run(rows=slice(None)):
        x = s[rows].clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            p = inclusion_prob_exact(x, items[rows], 20, num_nodes=12, top_m=top_m, tail=tail)
        (grad,) = torch.autograd.grad((weights[rows] * p.log()).sum(), x)
        with torch.no_grad():
            p_no_grad = inclusion_prob_exact(s[rows], items[rows], 20, num_nodes=12, top_m=top_m, tail=tail)
        assert torch.equal(p_no_grad, p.detach())
        return p.detach(), grad, sum(saved)

    p_whole, grad_whole, saved_whole = run()
    one_by_one = [run(slice(b, b + 1))[:2] for b in range(6)]
    monkeypatch.setattr(inclusion, "_EXACT_TORCH_MAX_ELEMENTS", 1)  # one row per chunk
    p_rows, grad_rows, saved_rows = run()
    assert torch.equal(p_rows, torch.cat([p for p, _ in one_by_one]))
    assert torch.equal(grad_rows, torch.cat([grad for _, grad in one_by_one]))
    torch.testing.assert_close(p_rows, p_whole, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad_rows, grad_whole, rtol=0, atol=1e-14)
    if tail == "exact":  # the (rows, L, N, nodes) tail terms are no longer kept
        assert saved_rows < saved_whole / 5
