"""The Plackett-Luce policy against brute force: every ordered list enumerated with naive sequential
softmax products (plain Python floats), a peaked policy where the textbook normaliser cancels, a
chi-square test of the Gumbel top-k sampler against the enumerated PL probabilities, masks, the
deterministic top-k, the with-replacement / per-item log-probabilities, the entropy (against
scipy.stats.entropy), and batch / dtype behaviour."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from rag_capg.pg.policy import (
    deterministic_top_k,
    entropy,
    item_log_prob,
    kl_to_reference,
    plackett_luce_log_prob,
    sample_plackett_luce,
    with_replacement_log_prob,
)
from tests.pg.reference import naive_pl_prob


def all_ordered_lists(n: int, k: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(range(n), k))


def random_logits(n: int, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(1, n, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_pl_log_prob_equals_enumeration_over_all_ordered_lists(n):
    for k in range(1, min(3, n) + 1):
        for seed, scale in [(n, 1.0), (10 + n, 3.0)]:
            s = random_logits(n, seed, scale)
            lists = all_ordered_lists(n, k)
            got = plackett_luce_log_prob(s.expand(len(lists), n), torch.tensor(lists))
            want = torch.tensor([math.log(float(naive_pl_prob(s[0].tolist(), c))) for c in lists], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
            # a distribution over the ordered k-lists
            assert abs(float(got.exp().sum()) - 1.0) < 1e-12


def test_peaked_policy_stays_finite_and_exact_where_the_textbook_normaliser_cancels():
    # Logits 50 nats apart at the top: once item 0 (w = e^50) is drawn, the rest weighs ~e^10, far below
    # float64 resolution of e^50. The textbook D_2 = exp(Z) - w_0 has lost all of it; the suffix form is a
    # sum of positive terms.
    s = torch.tensor([[50.0, 10.0, 9.0, 0.0, -3.0, -40.0]], dtype=torch.float64)
    lists = all_ordered_lists(6, 3)
    want = torch.tensor([math.log(float(naive_pl_prob(s[0].tolist(), c))) for c in lists], dtype=torch.float64)
    x = s.expand(len(lists), 6).clone().requires_grad_(True)
    got = plackett_luce_log_prob(x, torch.tensor(lists))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)

    # the case really is hard: the textbook normaliser D_2 for (0, 1, 2) has lost (nearly) all its digits
    z = torch.logsumexp(s[0], 0)
    textbook_d2 = float(torch.exp(z) - torch.exp(s[0, 0]))
    true_d2 = float(torch.exp(s[0, 1:]).sum())
    assert abs(textbook_d2 - true_d2) > 0.5 * true_d2

    # gradients: finite and equal to autograd through the naive product
    (grad,) = torch.autograd.grad(got.sum(), x)
    assert torch.isfinite(grad).all()
    for row in [0, lists.index((0, 1, 2)), lists.index((5, 4, 3)), len(lists) - 1]:
        s_ref = s[0].clone().requires_grad_(True)
        (want_grad,) = torch.autograd.grad(naive_pl_prob(s_ref, lists[row]).log(), s_ref)
        torch.testing.assert_close(grad[row], want_grad, atol=1e-10, rtol=0)


def test_with_replacement_and_item_log_prob_against_log_softmax():
    s = random_logits(7, 0, 2.0).expand(3, 7)
    lists = torch.tensor([[0, 3, 6], [6, 5, 4], [2, 2, 1]])  # repeats allowed: K draws with replacement
    log_p = torch.log_softmax(s, dim=1)
    torch.testing.assert_close(item_log_prob(s, lists), log_p.gather(1, lists), atol=1e-12, rtol=0)
    naive = [sum(math.log(math.exp(s[0, c]) / sum(math.exp(x) for x in s[0].tolist())) for c in row)
             for row in lists.tolist()]
    torch.testing.assert_close(with_replacement_log_prob(s, lists), torch.tensor(naive, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_entropy_against_scipy_and_ignores_impossible_items():
    # rows: 4 random logits; a peaked row with an impossible (-inf) item
    s = torch.cat([random_logits(4, 1, 2.0), torch.tensor([[float("-inf"), 30.0, -30.0, 0.0]], dtype=torch.float64)])
    got = entropy(s)
    for row in range(2):
        p = torch.softmax(s[row], 0).numpy()
        assert math.isclose(float(got[row]), float(stats.entropy(p)), abs_tol=1e-12)
    assert torch.isfinite(got).all()
    # uniform over N items: log N; point mass: 0
    assert math.isclose(float(entropy(torch.zeros(1, 10))[0]), math.log(10), rel_tol=1e-6)
    assert float(entropy(torch.tensor([[0.0, float("-inf"), float("-inf")]]))[0]) == 0.0


def _list_frequencies(lists: torch.Tensor, all_lists: list[tuple[int, ...]]) -> np.ndarray:
    """Counts of each ordered list (in all_lists order) among the rows of lists (S, K)."""
    n = int(max(max(c) for c in all_lists)) + 1
    codes = torch.zeros(lists.shape[0], dtype=torch.int64)
    for k in range(lists.shape[1]):
        codes = codes * n + lists[:, k]
    code_of = {sum(c[k] * n ** (len(c) - 1 - k) for k in range(len(c))): i for i, c in enumerate(all_lists)}
    counts = torch.bincount(codes, minlength=n ** lists.shape[1]).numpy()
    assert counts.sum() == sum(counts[code] for code in code_of)  # no list outside the enumeration
    return np.array([counts[code] for code in code_of])


@pytest.mark.parametrize("k", [2, 3])
def test_sampler_frequencies_match_pl_probabilities_chi_square(k):
    num_samples = 200_000
    s = torch.tensor([[0.6, 0.2, 0.0, -0.3, -0.9]], dtype=torch.float64)
    all_lists = all_ordered_lists(5, k)
    probs = np.array([float(naive_pl_prob(s[0].tolist(), c)) for c in all_lists])
    lists = sample_plackett_luce(s.expand(num_samples, 5), k, generator=torch.Generator().manual_seed(k))
    assert lists.shape == (num_samples, k) and lists.dtype == torch.int64
    counts = _list_frequencies(lists, all_lists)
    assert probs.min() * num_samples > 50  # chi-square needs non-tiny expected counts
    assert stats.chisquare(counts, probs * num_samples).pvalue > 1e-3
    # the test has power: the same counts reject the PL law of slightly different logits
    wrong = [0.5, 0.3, 0.0, -0.3, -0.9]
    wrong_probs = np.array([float(naive_pl_prob(wrong, c)) for c in all_lists])
    assert stats.chisquare(counts, wrong_probs * num_samples).pvalue < 1e-6


def test_masked_sampler_is_pl_over_the_allowed_items_and_reproducible():
    num_samples = 100_000
    s = torch.tensor([[0.6, 2.0, 0.0, -0.3, -0.9]], dtype=torch.float64)
    mask = torch.tensor([[False, True, False, False, False]]).expand(num_samples, 5)
    g = torch.Generator().manual_seed(5)
    lists = sample_plackett_luce(s.expand(num_samples, 5), 2, mask=mask, generator=g)
    assert not (lists == 1).any()  # the heaviest item is masked: never drawn
    allowed = [0, 2, 3, 4]
    all_lists = [c for c in all_ordered_lists(5, 2) if 1 not in c]
    probs = np.array([float(naive_pl_prob([s[0, j].item() for j in allowed], tuple(allowed.index(i) for i in c)))
                      for c in all_lists])
    assert stats.chisquare(_list_frequencies(lists, all_lists), probs * num_samples).pvalue > 1e-3
    # same seed, same draw; other seed, other draw
    again = sample_plackett_luce(s.expand(num_samples, 5), 2, mask=mask, generator=torch.Generator().manual_seed(5))
    other = sample_plackett_luce(s.expand(num_samples, 5), 2, mask=mask, generator=torch.Generator().manual_seed(6))
    assert torch.equal(lists, again) and not torch.equal(lists, other)


def test_sampler_and_top_k_refuse_rows_with_fewer_than_k_allowed_items():
    s = torch.zeros(2, 4)
    mask = torch.tensor([[False, False, False, False], [True, True, False, False]])
    assert sample_plackett_luce(s, 2, mask=mask).shape == (2, 2)
    with pytest.raises(ValueError, match="row 1 has only 2 allowed"):
        sample_plackett_luce(s, 3, mask=mask)
    with pytest.raises(ValueError, match="only 2 allowed"):
        deterministic_top_k(s, 3, mask=mask)
    # an item of weight exp(-inf) = 0 is not drawable either
    s_inf = torch.tensor([[0.0, float("-inf"), float("-inf"), 1.0]])
    with pytest.raises(ValueError, match="only 2 allowed"):
        sample_plackett_luce(s_inf, 3)
    drawn = sample_plackett_luce(s_inf.expand(1000, 4), 2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {0, 3}
    # nor is a NaN logit (top-k would rank it first; the sampler takes the masked path instead)
    s_nan = torch.tensor([[0.0, float("nan"), 1.0, -1.0]])
    drawn = sample_plackett_luce(s_nan.expand(1000, 4), 3, generator=torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {0, 2, 3}
    assert deterministic_top_k(s_nan, 3).tolist() == [[2, 0, 3]]
    with pytest.raises(ValueError, match="only 3 allowed"):
        deterministic_top_k(s_nan, 4)
    for bad_k in (0, 5):
        with pytest.raises(ValueError, match="k must be in"):
            sample_plackett_luce(s, bad_k)
    with pytest.raises(ValueError, match="mask must be a bool"):
        sample_plackett_luce(s, 1, mask=mask.float())


def test_deterministic_top_k_is_the_sorted_top_k():
    s = random_logits(50, 3, dtype=torch.float32).expand(4, 50).contiguous()
    s[1] = -s[1]
    for k in (1, 7, 50):
        got = deterministic_top_k(s, k)
        want = torch.from_numpy(np.argsort(-s.numpy(), axis=1, kind="stable")[:, :k].copy())
        assert torch.equal(got, want)
    mask = torch.zeros(4, 50, dtype=torch.bool)
    best = s.argmax(dim=1)
    mask[torch.arange(4), best] = True
    got = deterministic_top_k(s, 5, mask=mask)
    masked = s.masked_fill(mask, float("-inf")).numpy()
    want = torch.from_numpy(np.argsort(-masked, axis=1, kind="stable")[:, :5].copy())
    assert torch.equal(got, want) and not (got == best[:, None]).any()


def test_batch_rows_equal_rows_one_at_a_time():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(6, 30, generator=g, dtype=torch.float64) * 2
    lists = torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(6)])
    batch = [plackett_luce_log_prob(s, lists), with_replacement_log_prob(s, lists), entropy(s)]
    items = item_log_prob(s, lists)
    for b in range(6):
        row, row_lists = s[b:b + 1], lists[b:b + 1]
        one = [plackett_luce_log_prob(row, row_lists), with_replacement_log_prob(row, row_lists), entropy(row)]
        for got, want in zip(batch, one):
            torch.testing.assert_close(got[b:b + 1], want, atol=1e-12, rtol=0)
        torch.testing.assert_close(items[b:b + 1], item_log_prob(s[b:b + 1], lists[b:b + 1]), atol=1e-12, rtol=0)


def test_float32_agrees_with_float64_and_half_precision_is_upcast():
    g = torch.Generator().manual_seed(8)
    s64 = torch.randn(4, 40, generator=g, dtype=torch.float64) * 3
    lists = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(4)])
    for fn in (plackett_luce_log_prob, with_replacement_log_prob, item_log_prob):
        got32 = fn(s64.float(), lists)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), fn(s64, lists), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy(s64.float()).double(), entropy(s64), atol=1e-5, rtol=1e-5)
    # half precision: exp(12) = 162755 overflows float16 (max 65504); the upcast computes in float32
    s16 = torch.tensor([[12.0, 11.0, 0.0, -5.0]], dtype=torch.float16)
    half_list = torch.tensor([[0, 1]])
    for half in (s16, s16.to(torch.bfloat16)):
        for fn in (plackett_luce_log_prob, with_replacement_log_prob, item_log_prob, entropy):
            args = (half,) if fn is entropy else (half, half_list)
            got = fn(*args)
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            want = fn(*((half.float(),) if fn is entropy else (half.float(), half_list)))
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    want = math.log(float(naive_pl_prob([12.0, 11.0, 0.0, -5.0], (0, 1))))
    assert math.isclose(float(plackett_luce_log_prob(s16, half_list)[0]), want, abs_tol=1e-5)


def test_invalid_inputs_raise():
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="outside"):
        plackett_luce_log_prob(s, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="B=2 rows"):
        plackett_luce_log_prob(s, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        item_log_prob(s, torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        entropy(torch.zeros(5))
    with pytest.raises(ValueError, match="floating point"):
        entropy(torch.zeros(2, 5, dtype=torch.int64))


def test_logsumexp_excluding_matches_autograd_and_survives_underflow():
    # The fused one-pass form against logsumexp over the kept entries by plain autograd: ordinary rows, then a
    # row whose kept entries all lie 200 nats below the excluded maximum (exp underflows in float32: the
    # exact fallback path) and a row with nothing kept (a huge negative, finite value and a finite gradient).
    from rag_capg.pg.policy import _logsumexp_excluding

    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 12, generator=g, dtype=torch.float32) * 3
    index = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(4)])
    x = s.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((_logsumexp_excluding(x, index) * torch.arange(1.0, 5.0)).sum(), x)
    keep = torch.ones_like(s, dtype=torch.bool).scatter(1, index, False)
    y = s.clone().requires_grad_(True)
    want = torch.stack([torch.logsumexp(y[b][keep[b]], 0) for b in range(4)])
    (want_grad,) = torch.autograd.grad((want * torch.arange(1.0, 5.0)).sum(), y)
    torch.testing.assert_close(_logsumexp_excluding(s, index), want.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)

    far = torch.tensor([[0.0, -200.0, -201.0], [1.0, 2.0, 3.0]]).requires_grad_(True)
    value = _logsumexp_excluding(far, torch.tensor([[0], [0]]))
    assert abs(float(value[0].detach()) - math.log(math.exp(-200.0) + math.exp(-201.0))) < 1e-4
    (grad_far,) = torch.autograd.grad(value[0], far)
    torch.testing.assert_close(grad_far[0], torch.tensor([0.0, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]))
    # kept mass ~1e-37 of the excluded maximum and a large incoming gradient: the gradient is the kept
    # entries' softmax times it (scaling by 1 / kept mass first overflowed float32 to inf); and a kept mass
    # ~e^-50 (summed in the one-pass node or not) against plain autograd in float64
    tiny_mass = torch.tensor([[0.0, -85.0, -85.5]]).requires_grad_(True)
    (grad_tiny,) = torch.autograd.grad(1e3 * _logsumexp_excluding(tiny_mass, torch.tensor([[0]])).sum(), tiny_mass)
    softmax_kept = torch.tensor([0.0, 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))])
    torch.testing.assert_close(grad_tiny[0], 1e3 * softmax_kept, rtol=1e-5, atol=0)
    mid = torch.cat([torch.zeros(1, 1), -50.0 - torch.rand(1, 200, generator=g) * 25], dim=1)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        x = mid.to(dtype).requires_grad_(True)
        (got_grad,) = torch.autograd.grad((got := _logsumexp_excluding(x, torch.tensor([[0]]))).sum(), x)
        y = mid.double()[:, 1:].requires_grad_(True)
        (want_grad,) = torch.autograd.grad((want := torch.logsumexp(y, 1)).sum(), y)
        assert abs(float(got.detach()) - float(want.detach())) < 1e-4
        torch.testing.assert_close(got_grad[0, 1:].double(), want_grad[0], atol=tol, rtol=tol)
    nothing = torch.zeros(1, 3, requires_grad=True)
    value = _logsumexp_excluding(nothing, torch.tensor([[0, 1, 2]]))
    assert torch.isfinite(value).all() and float(value.detach()) < -1e30
    (grad_nothing,) = torch.autograd.grad(value.sum(), nothing)
    assert torch.isfinite(grad_nothing).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_or_zero_is_exp_above_the_normal_range_and_zero_below(dtype):
    from rag_capg.pg.policy import _exp_or_zero

    floor = math.log(torch.finfo(dtype).tiny) + 20.0
    x = torch.tensor([0.0, -1.0, -50.0, floor + 0.01, floor - 0.01, -1000.0, float("-inf")], dtype=dtype)
    want = torch.where(x < floor, torch.zeros_like(x), torch.exp(x.double()).to(dtype))
    assert torch.equal(_exp_or_zero(x.clone()), want)
    assert torch.equal(_exp_or_zero(x[:4].clone()), torch.exp(x[:4]))  # the path with nothing below
    # under autograd: out of place, the gradient of exp where kept and 0 where set to 0
    y = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_exp_or_zero(y).sum(), y)
    assert torch.equal(grad, want) and torch.equal(y.detach(), x)


def test_log_probs_of_a_sharp_policy_match_float64():
    # (CA-PG's log P as well: it lives in rag_capg.pg.inclusion but shares these normalisers.)
    # A logit range of +-400 puts most entries hundreds of nats below each row's maximum, where float32 exp is
    # subnormal or 0 (and slow); the normalisers must still be right and the gradients finite.
    g = torch.Generator().manual_seed(11)
    s64 = torch.randn(6, 300, generator=g, dtype=torch.float64) * 150
    items = torch.stack([torch.randperm(300, generator=g)[:3] for _ in range(6)])
    items[:, 0] = s64.argmax(dim=1)
    lists = deterministic_top_k(s64, 5)
    from rag_capg.pg.inclusion import log_inclusion_prob

    def log_p_approx(x, idx):
        return log_inclusion_prob(x, idx, 5)

    for fn, idx in ((item_log_prob, items), (plackett_luce_log_prob, lists), (log_p_approx, items)):
        x = s64.float().requires_grad_(True)
        got = fn(x, idx)
        (grad,) = torch.autograd.grad(got.sum(), x)
        y = s64.float().double().requires_grad_(True)  # the same (float32-rounded) logits, in float64
        want = fn(y, idx)
        (want_grad,) = torch.autograd.grad(want.sum(), y)
        torch.testing.assert_close(got.double(), want.detach(), atol=1e-3, rtol=1e-5)
        assert torch.isfinite(grad).all()
        # float32 log-space sums at |logits| ~ 400 carry ~3e-5 absolute error: the bar is float32's, not exact
        torch.testing.assert_close(grad.double(), want_grad, atol=1e-4, rtol=1e-3)


def test_kl_to_reference_equals_the_sum_over_the_corpus_and_its_closed_form_gradient():
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(3, 12, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    s0 = torch.randn(3, 12, generator=g, dtype=torch.float64) * 2
    kl = kl_to_reference(s, s0)
    for b in range(3):  # brute force: sum_j p_j log(p_j / p0_j), from the definitions
        w, w0 = [math.exp(x) for x in s[b].tolist()], [math.exp(x) for x in s0[b].tolist()]
        p, p0 = [x / sum(w) for x in w], [x / sum(w0) for x in w0]
        assert kl[b].item() == pytest.approx(sum(a * math.log(a / c) for a, c in zip(p, p0)), rel=1e-12)
    (grad,) = torch.autograd.grad(kl.sum(), s)
    p = torch.softmax(s.detach(), 1)
    d = s.detach() - s0
    # method doc section 5: d KL / d s_k = p_k ((s_k - s0_k) - sum_j p_j (s_j - s0_j))
    torch.testing.assert_close(grad, p * (d - (p * d).sum(1, keepdim=True)), atol=1e-12, rtol=0)
    assert kl_to_reference(s0, s0).abs().max() < 1e-12  # zero at the reference


def test_one_generator_per_row_block_draws_what_each_generator_draws_alone():
    s = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    rows = s.repeat_interleave(2, dim=0)  # 3 queries x 2 lists
    batched = sample_plackett_luce(rows, 5, generator=[torch.Generator().manual_seed(100 + i) for i in range(3)])
    for i in range(3):
        alone = sample_plackett_luce(rows[2 * i:2 * i + 2], 5, generator=torch.Generator().manual_seed(100 + i))
        assert torch.equal(batched[2 * i:2 * i + 2], alone)
    with pytest.raises(ValueError, match="equal blocks"):
        sample_plackett_luce(rows, 5, generator=[torch.Generator() for _ in range(4)])
