"""The synthetic environment: shapes, reward ranges, the oracle LSR kinds and the oracle value."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from rag_capg.simulate.env import make_env


@pytest.fixture(scope="module")
def env():
    return make_env(seed=0)


def test_shapes_and_reward_ranges(env):
    assert env.user_features.shape == (1000, 10) and env.item_features.shape == (1000, 10)
    assert env.expected.shape == env.reward_mean.shape == env.reward_std.shape == (1000, 1000)
    torch.testing.assert_close(env.user_features.norm(dim=1), torch.ones(1000))
    torch.testing.assert_close(env.item_features.norm(dim=1), torch.ones(1000))
    assert env.user_features.abs().max() <= 1 and env.item_features.abs().max() <= 1
    # |x^T M e| <= ||M^T x|| <= sqrt(d) for unit x, e and unit-norm rows of M, and eta in (0, 1).
    assert env.expected.abs().max() <= 10 * 10 ** 0.5
    assert env.expected.std() > 1.0  # the reward actually varies across items
    assert (env.reward_mean >= 1.0).all()
    torch.testing.assert_close(env.reward_mean, torch.nn.functional.softplus(env.expected) + 1)
    assert (env.reward_std > 0).all() and (env.reward_std < 1).all()


def test_same_seed_same_env_other_seed_differs():
    a, b, c = make_env(num_users=30, num_items=40, seed=3), make_env(num_users=30, num_items=40, seed=3), \
        make_env(num_users=30, num_items=40, seed=4)
    assert torch.equal(a.expected, b.expected)
    assert not torch.equal(a.expected, c.expected)


def test_observed_reward_is_normal_with_the_stated_mean_and_std(env):
    g = torch.Generator().manual_seed(0)
    users = torch.tensor([3, 500])
    items = torch.tensor([[10], [999]])
    draws = torch.stack([env.observe(users, items, g) for _ in range(20_000)])  # (S, 2, 1)
    assert (draws >= 0).all()
    mean = env.reward_mean[users.unsqueeze(1), items]
    std = env.reward_std[users.unsqueeze(1), items]
    torch.testing.assert_close(draws.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(draws.std(0), std, atol=0.03, rtol=0)


def _lists(env, b, k, seed):
    g = torch.Generator().manual_seed(seed)
    return env.sample_users(b, g), torch.rand(b, env.num_items, generator=g).topk(k, dim=1).indices


def test_optimal_and_anti_lsr_pick_argmax_and_argmin(env):
    users, lists = _lists(env, 64, 10, 0)
    for kind, num_picks in [("optimal", 1), ("optimal", 3), ("anti", 1), ("anti", 3)]:
        pos = env.lsr_pick(users, lists, num_picks, kind=kind)
        for b in range(64):
            q = [env.expected[users[b], i].item() for i in lists[b]]
            order = sorted(range(10), key=lambda j: q[j], reverse=(kind == "optimal"))
            assert pos[b].tolist() == order[:num_picks]


def test_uniform_lsr_is_uniform_and_noisy_lsr_follows_the_softmax(env):
    g = torch.Generator().manual_seed(1)
    users = torch.full((50_000,), 7)
    lists = torch.arange(10).expand(50_000, 10)
    counts = torch.bincount(env.lsr_pick(users, lists, 1, kind="uniform", generator=g)[:, 0], minlength=10)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    # Without replacement: L=3 distinct positions.
    pos3 = env.lsr_pick(users[:1000], lists[:1000], 3, kind="uniform", generator=g)
    assert all(len(set(row)) == 3 for row in pos3.tolist())
    temperature = 2.0
    counts = torch.bincount(env.lsr_pick(users, lists, 1, kind="noisy", temperature=temperature, generator=g)[:, 0],
                            minlength=10)
    expected = torch.softmax(env.expected[7, :10].double() / temperature, 0) * 50_000
    keep = expected > 5  # chi-square needs non-tiny expected counts; merge the rest
    obs = torch.cat([counts[keep].double(), counts[~keep].double().sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1] * (obs[:-1].sum() / exp[:-1].sum())
    assert stats.chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_oracle_is_the_best_subset_by_brute_force():
    """On a tiny env, the top-K oracle equals the best of all K-subsets for every deterministic LSR."""
    small = make_env(num_users=4, num_items=7, seed=5)
    users = torch.arange(4)
    for kind, k, num_picks in [("optimal", 3, 1), ("optimal", 3, 2), ("anti", 3, 1), ("anti", 2, 2)]:
        best = torch.full((4,), -float("inf"))
        for subset in itertools.combinations(range(7), k):
            lists = torch.tensor(subset).expand(4, k)
            pos = small.lsr_pick(users, lists, num_picks, kind=kind)
            value = small.reward_mean[users.unsqueeze(1), lists.gather(1, pos)].mean(1)
            best = torch.maximum(best, value)
        assert small.oracle_value(k, num_picks, kind=kind) == pytest.approx(best.mean().item(), rel=1e-6)


def test_oracle_beats_random_and_anti_is_worst(env):
    g = torch.Generator().manual_seed(2)
    for k in (5, 20):
        oracle = env.oracle_value(k, 1)
        rand = env.random_value(k, 1, generator=g)
        assert oracle > rand + 1.0
        # A better LSR makes the same candidates worth more.
        users, lists = _lists(env, 4000, k, 3)
        values = [env.two_stage_value(users, lists, 1, kind=kind, generator=g)
                  for kind in ("optimal", "noisy", "uniform", "anti")]
        assert values == sorted(values, reverse=True)
    # With L=1 and the optimal LSR the oracle is the per-user best item, whatever K.
    assert env.oracle_value(5, 1) == pytest.approx(env.reward_mean.max(dim=1).values.mean().item(), rel=1e-6)
