"""The online training loop: it learns, it is deterministic, and V-PG blow-ups stop a run cleanly."""

from __future__ import annotations

import math

import pytest
import torch

import rag_capg.simulate.runner as runner
from rag_capg.simulate.env import make_env
from rag_capg.simulate.runner import TwoTowerESR, evaluate, run, steps_to_fraction


@pytest.fixture(scope="module")
def env():
    return make_env(seed=0)


def test_capg_improves_the_policy_value(env):
    res = run(env, estimator="capg", k=10, steps=400, eval_every=200, eval_contexts=2000, seed=0)
    assert res.stopped_at is None and res.status() == "finished"
    assert res.steps == [0, 200, 400] and res.train_steps == 400
    oracle = env.oracle_value(10, 1)
    assert res.values[0] < 0.8 * oracle  # a random initial ESR is far from the oracle ...
    assert res.values[-1] > res.values[0] + 0.3  # ... and 400 CA-PG steps clearly improve it
    assert res.values[-1] <= oracle + 1e-6  # nothing beats the true top-K


def test_same_seed_same_curve(env):
    a = run(env, estimator="top1", k=5, steps=60, eval_every=30, eval_contexts=500, seed=3)
    b = run(env, estimator="top1", k=5, steps=60, eval_every=30, eval_contexts=500, seed=3)
    c = run(env, estimator="top1", k=5, steps=60, eval_every=30, eval_contexts=500, seed=4)
    assert a.values == b.values
    assert a.values != c.values


def test_vpg_blow_up_is_caught_and_reported(env):
    """A huge learning rate drives V-PG's logits to overflow: the run stops and says why, no exception."""
    res = run(env, estimator="vpg", k=20, steps=300, eval_every=100, eval_contexts=500, lr=1e30, seed=0)
    assert res.stopped_at is not None and 1 <= res.stopped_at <= 300
    assert "non-finite" in res.stop_reason
    assert res.status() == f"stopped at step {res.stopped_at} ({res.stop_reason})"
    assert res.train_steps == res.stopped_at - 1
    assert all(math.isfinite(v) for v in res.values)  # evaluations before the blow-up stay valid


def test_non_finite_loss_stops_at_that_step(env, monkeypatch):
    real = runner.surrogate_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(runner, "surrogate_loss", flaky)
    res = run(env, estimator="vpg_swr", k=5, steps=10, eval_every=5, eval_contexts=200, seed=0)
    assert (res.stopped_at, res.stop_reason) == (3, "non-finite loss")
    assert res.steps == [0]


def test_evaluate_matches_the_oracle_for_a_perfect_esr(env):
    """An ESR whose logits are the true expected rewards evaluates to the oracle value."""
    esr = TwoTowerESR(env.num_users, env.num_items, dim=1)
    esr.forward = lambda users: env.expected[users]  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    value = evaluate(esr, env, 20, 1, lsr="optimal", temperature=1.0, num_contexts=20_000, generator=g)
    assert value == pytest.approx(env.oracle_value(20, 1), rel=0.01)


def test_steps_to_fraction():
    assert steps_to_fraction([0, 10, 20], [1.0, 5.0, 9.0], 5.0) == 10
    assert steps_to_fraction([0, 10], [1.0, 2.0], 5.0) is None
