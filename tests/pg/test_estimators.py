"""Estimators against the exact policy gradient and against closed forms.

* The exact grad V(theta), V = sum over all ordered lists S of pi(S) E[mean_l r(a_l) | S], is enumerated
  with autograd for a small corpus (N=5, K=3) and an LSR that picks the best item of S or one uniformly
  at random. V-PG's Monte-Carlo mean gradient (``gradient_variance``) must match it within 5 standard
  errors for both LSRs; CA-PG with the exact inclusion probability must match it for the uniform LSR
  (the argument in the estimators docstring); the biased estimators must fail the same check.
* At K=20 (N=200) CA-PG's gradient variance is far below V-PG's.
* TOP1 / V-PG-SwR gradients against their closed forms r (e_a - p), ``gradient_variance`` against
  per-sample gradients computed one at a time, input validation, ``group_baseline_rewards``' properties,
  batch rows vs single rows and dtypes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rag_capg.pg.estimators import ESTIMATORS, gradient_variance, group_baseline_rewards, surrogate_loss
from rag_capg.pg.policy import sample_plackett_luce
from tests.pg.reference import naive_pl_prob

SMALL_LOGITS = torch.tensor([[0.3, -0.4, 0.1, 0.8, -1.0]], dtype=torch.float64)
SMALL_REWARDS = torch.tensor([1.0, 0.2, 2.0, 0.5, 1.5], dtype=torch.float64)  # r(item), fixed
SMALL_K = 3
EXACT_OPTIONS = {"exact_top_m": None, "exact_nodes": 64}  # full DP over the 5 items


def exact_policy_gradient(logits: torch.Tensor, rewards: torch.Tensor, k: int, lsr: str) -> torch.Tensor:
    """grad V for V = sum_S pi(S) E[r(a) | S]: the LSR's pick a is the best item of S ("best") or
    uniform over S ("uniform"), so E[r(a) | S] is max_{a in S} r(a) or mean_{a in S} r(a). (N,)"""
    s = logits[0].clone().requires_grad_(True)
    value = torch.zeros((), dtype=s.dtype)
    for ordered_list in itertools.permutations(range(s.shape[0]), k):
        r = rewards[list(ordered_list)]
        value = value + naive_pl_prob(s, ordered_list) * (r.max() if lsr == "best" else r.mean())
    (grad,) = torch.autograd.grad(value, s)
    return grad


def lsr_draw(rewards: torch.Tensor, k: int, lsr: str):
    """draw_fn for gradient_variance: a PL list, one LSR pick ("best" or "uniform"), its reward."""
    def draw(logits, generator):
        lists = sample_plackett_luce(logits, k, generator=generator)
        if lsr == "best":
            position = rewards[lists].argmax(dim=1, keepdim=True)
        else:
            position = torch.randint(k, (logits.shape[0], 1), generator=generator)
        picks = lists.gather(1, position)
        return lists, picks, rewards[picks].to(logits.dtype)
    return draw


def mc_error_in_standard_errors(estimator: str, lsr: str, num_samples: int, seed: int, **options) -> float:
    """||MC mean gradient - exact gradient|| in units of sqrt(trace variance / n), the root mean square of
    that norm for an unbiased estimator (E ||mean - g||^2 = tr Cov / n)."""
    out = gradient_variance(estimator, SMALL_LOGITS, lsr_draw(SMALL_REWARDS, SMALL_K, lsr), num_samples,
                            generator=torch.Generator().manual_seed(seed), chunk_size=20_000, **options)
    exact = exact_policy_gradient(SMALL_LOGITS, SMALL_REWARDS, SMALL_K, lsr)
    standard_error = (out["trace_variance"] / num_samples) ** 0.5
    assert out["mean_gradient"].shape == (1, 5) and standard_error > 0
    return float((out["mean_gradient"][0] - exact).norm()) / standard_error


@pytest.mark.parametrize("lsr", ["best", "uniform"])
def test_vpg_is_unbiased(lsr):
    # Even with all the error variance in one coordinate, 5 standard errors is a 6e-7 event for a
    # Gaussian mean; the biased estimators below sit at 20-200 standard errors on the same check.
    assert mc_error_in_standard_errors("vpg", lsr, 60_000, seed=1) < 5.0


def test_capg_exact_is_unbiased_for_a_uniformly_random_lsr():
    # E[r(a) grad log P(a in S)] = (1/K) sum_a r(a) grad P(a in S) = grad V when a is uniform over S.
    assert mc_error_in_standard_errors("capg_exact", "uniform", 20_000, seed=2, **EXACT_OPTIONS) < 5.0


@pytest.mark.parametrize("estimator, lsr", [("vpg_swr", "uniform"), ("top1", "uniform"), ("capg", "uniform"),
                                            ("capg_exact", "best")])
def test_biased_estimators_fail_the_same_check(estimator, lsr):
    # The check has power: the with-replacement scores, the approximate inclusion probability and the
    # credit-assigned decomposition under a selective LSR do not give grad V.
    assert mc_error_in_standard_errors(estimator, lsr, 20_000, seed=3, **EXACT_OPTIONS) > 10.0


def test_capg_gradient_variance_is_far_below_vpg_at_k20():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 200, generator=g, dtype=torch.float64)
    rewards = torch.rand(200, generator=g, dtype=torch.float64) * 2 + 0.5  # fixed positive reward table
    draw = lsr_draw(rewards, 20, "best")  # the optimal LSR: the best item of the list
    trace = {}
    for estimator, num_samples in [("vpg", 2000), ("capg", 2000), ("capg_exact", 400)]:
        out = gradient_variance(estimator, logits, draw, num_samples, generator=torch.Generator().manual_seed(1),
                                chunk_size=num_samples)
        trace[estimator] = out["trace_variance"]
    # V-PG's score sums K per-position terms, CA-PG's is one per picked item (seen: ~120 against ~4)
    assert trace["vpg"] > 10 * trace["capg"]
    assert trace["vpg"] > 10 * trace["capg_exact"]


def test_top1_and_vpg_swr_gradients_equal_their_closed_forms():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 8, generator=g, dtype=torch.float64)
    lists = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(3)])
    picks = lists[:, [0, 2]]
    rewards = torch.rand(3, 2, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot

    def ascent(estimator):
        x = logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(surrogate_loss(estimator, x, lists, picks, rewards), x)
        return -grad

    # grad log p_a = e_a - p; TOP1 averages r_l (e_{a_l} - p) over picks, the batch mean divides by B
    top1 = (rewards[..., None] * (onehot(picks, 8).double() - p[:, None, :])).mean(dim=1) / 3
    torch.testing.assert_close(ascent("top1"), top1, atol=1e-12, rtol=0)
    # V-PG-SwR: mean_l r_l * sum_k (e_{c_k} - p)
    swr = rewards.mean(dim=1, keepdim=True) * (onehot(lists, 8).double().sum(dim=1) - 4 * p) / 3
    torch.testing.assert_close(ascent("vpg_swr"), swr, atol=1e-12, rtol=0)


def test_gradient_variance_equals_per_sample_gradients_computed_one_at_a_time():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 12, generator=g, dtype=torch.float64)
    rewards = torch.rand(12, generator=g, dtype=torch.float64)
    draw = lsr_draw(rewards, 4, "best")
    for estimator in ESTIMATORS:
        out = gradient_variance(estimator, logits, draw, 40, generator=torch.Generator().manual_seed(6),
                                chunk_size=40)
        # the same draw (one chunk, same seed), then one surrogate loss per sample of the B=2 batch
        lists, picks, r = draw(logits.repeat(40, 1), torch.Generator().manual_seed(6))
        samples = []
        for i in range(40):
            x = logits.clone().requires_grad_(True)
            rows = slice(2 * i, 2 * i + 2)
            (grad,) = torch.autograd.grad(surrogate_loss(estimator, x, lists[rows], picks[rows], r[rows]), x)
            samples.append(-grad)
        samples = torch.stack(samples)
        torch.testing.assert_close(out["mean_gradient"], samples.mean(dim=0), atol=1e-10, rtol=0)
        assert abs(out["trace_variance"] - float(samples.var(dim=0, unbiased=True).sum())) < 1e-8
        assert out["num_samples"] == 40
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        gradient_variance("vpg", logits, draw, 1)


def test_negative_rewards_and_foreign_picks_are_refused():
    logits = torch.zeros(2, 6, requires_grad=True)
    lists = torch.tensor([[0, 1, 2], [3, 4, 5]])
    picks = torch.tensor([[1], [5]])
    negative = torch.tensor([[0.5], [-0.25]])
    for estimator in ("capg", "capg_exact", "top1"):
        with pytest.raises(ValueError, match=r"needs rewards >= 0, got a minimum reward of -0\.25"):
            surrogate_loss(estimator, logits, lists, picks, negative)
    for estimator in ("vpg", "vpg_swr"):  # REINFORCE on the list is fine with signed rewards
        assert torch.isfinite(surrogate_loss(estimator, logits, lists, picks, negative))
    with pytest.raises(ValueError, match="picks must be corpus indices taken from the same row of lists"):
        surrogate_loss("capg", logits, lists, torch.tensor([[1], [0]]), negative.abs())  # 0 is in row 0 only
    with pytest.raises(ValueError, match="unknown estimator"):
        surrogate_loss("reinforce", logits, lists, picks, negative)
    with pytest.raises(ValueError, match="NaN or infinite"):
        surrogate_loss("vpg", logits, lists, picks, torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(ValueError, match="shape of picks"):
        surrogate_loss("vpg", logits, lists, picks, torch.ones(2, 2))


def test_group_baseline_rewards_are_non_negative_order_preserving_and_zero_for_constant_groups():
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(5, 4, 3, generator=g, dtype=torch.float64) * 3 - 1
    rewards[2] = 0.7  # a constant group
    out = group_baseline_rewards(rewards)
    assert out.shape == rewards.shape and (out >= 0).all()
    assert torch.equal(out[2], torch.zeros(4, 3, dtype=torch.float64))
    flat_in, flat_out = rewards.reshape(5, -1), out.reshape(5, -1)
    for q in range(5):
        assert float(flat_out[q].min()) == 0.0  # the worst pick of the group gets 0
        # strictly order-preserving within the group
        if q != 2:
            order = flat_in[q].argsort()
            assert (flat_out[q][order].diff() > 0).all()
    # invariant to an affine change of the reward scale (a > 0) without the std floor
    varied = rewards[[0, 1, 3, 4]]
    torch.testing.assert_close(group_baseline_rewards(4.0 * varied + 9.0, min_std=0.0),
                               group_baseline_rewards(varied, min_std=0.0), atol=1e-9, rtol=0)
    # closed form for a two-reward group: mean 0.5, std 0.5, advantages -1 and +1, shifted to 0 and 2
    torch.testing.assert_close(group_baseline_rewards(torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)),
                               torch.tensor([[[0.0], [2.0]]], dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"\(Q, G, L\)"):
        group_baseline_rewards(torch.zeros(3, 4))


def test_group_baseline_does_not_blow_judge_noise_up_to_full_rewards():
    # Four lists of irrelevant passages whose judge scores differ by ~2e-4 (cross-encoder noise), and a
    # group with one relevant pick. Dividing by the std alone made the noise group's rewards as large as
    # the real preference's (~2); the floor keeps it on the reward scale: (r - mean) / min_std.
    noise = torch.tensor([0.3120, 0.3122, 0.3119, 0.3121], dtype=torch.float64)
    real = torch.tensor([0.05, 0.91, 0.04, 0.06], dtype=torch.float64)
    rewards = torch.stack([noise, real])[:, :, None]  # (Q=2, G=4, L=1)
    unfloored = group_baseline_rewards(rewards, min_std=1e-6)  # the old std + 1e-6
    assert float(unfloored[0].max()) > 1.0  # the bug: noise became a reward of order 1
    out = group_baseline_rewards(rewards)  # min_std = 0.01
    expected_noise = (noise - noise.mean()) / 0.01
    torch.testing.assert_close(out[0, :, 0], expected_noise - expected_noise.min(), atol=1e-9, rtol=0)
    assert float(out[0].max()) < 0.05
    # a group spread wider than the floor is normalised exactly as without it
    torch.testing.assert_close(out[1], group_baseline_rewards(rewards, min_std=0.0)[1], atol=0, rtol=0)
    assert float(out[1].max()) > 1.0
    with pytest.raises(ValueError, match="min_std"):
        group_baseline_rewards(rewards, min_std=-1.0)


def _batch_case(dtype=torch.float64, n=80, k=8):
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(4, n, generator=g, dtype=torch.float64) * 2).to(dtype)
    lists = sample_plackett_luce(logits, k, generator=g)
    picks = lists[:, [1, 4]]
    rewards = torch.rand(4, 2, generator=g, dtype=torch.float64)
    return logits, lists, picks, rewards


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_batch_rows_equal_rows_one_at_a_time(estimator):
    logits, lists, picks, rewards = _batch_case()
    options = {"exact_top_m": 20}  # N=80 > top_m + 1: exercises the tail path with B > 1
    x = logits.clone().requires_grad_(True)
    loss = surrogate_loss(estimator, x, lists, picks, rewards, **options)
    (grad,) = torch.autograd.grad(loss, x)
    singles = []
    for b in range(4):
        xb = logits[b:b + 1].clone().requires_grad_(True)
        loss_b = surrogate_loss(estimator, xb, lists[b:b + 1], picks[b:b + 1], rewards[b:b + 1], **options)
        singles.append(float(loss_b.detach()))
        # the batch loss is the mean of the rows' losses, so row b's gradient is 1/B of its own
        torch.testing.assert_close(grad[b:b + 1] * 4, torch.autograd.grad(loss_b, xb)[0], atol=1e-12, rtol=0)
    assert abs(float(loss.detach()) - sum(singles) / 4) < 1e-12


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float32_agrees_with_float64_and_half_is_upcast(estimator):
    logits, lists, picks, rewards = _batch_case()
    loss64 = surrogate_loss(estimator, logits, lists, picks, rewards)
    loss32 = surrogate_loss(estimator, logits.float(), lists, picks, rewards.float())
    assert loss64.dtype == torch.float64 and loss32.dtype == torch.float32
    assert abs(float(loss32) - float(loss64)) < 1e-4 * max(1.0, abs(float(loss64)))
    half = logits.half().requires_grad_(True)
    loss16 = surrogate_loss(estimator, half, lists, picks, rewards.half())
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    # same value as the float32 computation on the same (rounded) inputs
    ref = surrogate_loss(estimator, half.detach().float(), lists, picks, rewards.half().float())
    assert abs(float(loss16.detach()) - float(ref)) < 1e-6 * max(1.0, abs(float(ref)))
    (grad16,) = torch.autograd.grad(loss16, half)
    assert grad16.dtype == torch.float16 and torch.isfinite(grad16).all()
