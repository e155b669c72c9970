"""Online policy-gradient training of the two-tower ESR in the synthetic environment.

One run = one (estimator, K, seed). Each step draws a batch of contexts (user ids), samples one
Plackett-Luce candidate list of K items per context from the ESR (Gumbel top-K over the full softmax of
1000 items), lets the oracle LSR pick L of them, observes their noisy rewards and takes one Adagrad step
on the estimator's surrogate loss. Every ``eval_every`` steps the deterministic top-K ESR is evaluated
on fresh contexts: policy value = mean expected reward of the LSR's picks (see env.py).

Written the textbook way, V-PG's ordered Plackett-Luce likelihood is numerically fragile once the policy
sharpens: the normaliser of position k, exp(Z) - sum_{j<k} exp(s_{c_j}), cancels towards 0 (the paper
reports that its V-PG runs "overflow and stop early"). Ours uses the cancellation-free suffix form
(``rag_capg.pg.policy``). A run still checks the loss, the gradients and the updated parameters each
step; on the first non-finite value (a huge learning rate does it) it stops and is reported as stopped at
that step, the way the paper reports it, instead of crashing the benchmark.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from rag_capg.pg.estimators import surrogate_loss
from rag_capg.pg.policy import deterministic_top_k, sample_plackett_luce
from rag_capg.simulate.env import LSRKind, SyntheticEnv

# The paper's learning rates: the list-level estimators were tuned at 0.1, the item-level ones at 0.01.
DEFAULT_LR = {"vpg": 0.1, "vpg_swr": 0.1, "capg": 0.01, "capg_exact": 0.01, "top1": 0.01}


@dataclass
class RunResult:
    estimator: str
    k: int
    seed: int
    steps: list[int] = field(default_factory=list)  # evaluation steps (0 = before training)
    values: list[float] = field(default_factory=list)  # policy value at each evaluation step
    stopped_at: int | None = None  # the step whose update went non-finite, None if the run finished
    stop_reason: str | None = None  # e.g. "non-finite gradient"
    train_seconds: float = 0.0  # wall time spent in training steps (evaluation excluded)
    train_steps: int = 0  # training steps actually taken

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.train_seconds / max(self.train_steps, 1)

    def status(self) -> str:
        if self.stopped_at is None:
            return "finished"
        return f"stopped at step {self.stopped_at} ({self.stop_reason})"


class TwoTowerESR(torch.nn.Module):
    """Free user and item embeddings; logits = U[x] @ I^T over the whole item set (a full softmax)."""

    def __init__(self, num_users: int, num_items: int, dim: int = 10, init_std: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.user = torch.nn.Parameter(init_std * torch.randn(num_users, dim, generator=generator))
        self.item = torch.nn.Parameter(init_std * torch.randn(num_items, dim, generator=generator))

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.user[users] @ self.item.T


@torch.no_grad()
def evaluate(esr: TwoTowerESR, env: SyntheticEnv, k: int, num_picks: int, *, lsr: LSRKind, temperature: float,
             num_contexts: int, generator: torch.Generator, chunk: int = 4096) -> float:
    """Policy value of the deterministic top-K ESR followed by the LSR on ``num_contexts`` fresh contexts."""
    total = 0.0
    for start in range(0, num_contexts, chunk):
        n = min(chunk, num_contexts - start)
        users = env.sample_users(n, generator)
        lists = deterministic_top_k(esr(users), k)
        total += n * env.two_stage_value(users, lists, num_picks, kind=lsr, temperature=temperature,
                                         generator=generator)
    return total / num_contexts


def _all_finite(tensors) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def train_step(esr: TwoTowerESR, opt: torch.optim.Optimizer, env: SyntheticEnv, *, estimator: str, k: int,
               num_picks: int, lsr: LSRKind, temperature: float, batch_size: int, generator: torch.Generator,
               exact_nodes: int = 12, exact_top_m: int | None = 23) -> str | None:
    """One training step: sample contexts, ESR logits, Gumbel top-K lists, LSR picks, rewards, surrogate
    loss, backward, Adagrad update. Returns None, or why the step went non-finite (nothing is updated then,
    except when the parameters themselves came out non-finite)."""
    users = env.sample_users(batch_size, generator)
    logits = esr(users)
    lists = sample_plackett_luce(logits.detach(), k, generator=generator)
    pos = env.lsr_pick(users, lists, num_picks, kind=lsr, temperature=temperature, generator=generator)
    picks = lists.gather(1, pos)
    rewards = env.observe(users, picks, generator)
    try:
        loss = surrogate_loss(estimator, logits, lists, picks, rewards, exact_nodes=exact_nodes,
                              exact_top_m=exact_top_m)
        if not torch.isfinite(loss):
            return "non-finite loss"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not _all_finite(p.grad for p in esr.parameters()):
            return "non-finite gradient"
        opt.step()
        if not _all_finite(esr.parameters()):
            return "non-finite parameters"
    except (FloatingPointError, OverflowError) as err:  # an overflow raised rather than returned
        return f"numerical error: {err}"
    return None


def run(env: SyntheticEnv, *, estimator: str, k: int, num_picks: int = 1, lsr: LSRKind = "optimal",
        temperature: float = 1.0, steps: int = 10_000, eval_every: int = 1000, eval_contexts: int = 10_000,
        batch_size: int = 128, lr: float | None = None, embed_dim: int = 10, init_std: float = 1.0,
        seed: int = 0, exact_nodes: int = 12, exact_top_m: int | None = 23, device: str = "cpu",
        on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train one ESR with ``estimator`` and return its evaluation curve (deterministic given ``seed``)."""
    if not 1 <= num_picks <= k <= env.num_items:
        raise ValueError(f"need 1 <= num_picks ({num_picks}) <= K ({k}) <= number of items ({env.num_items})")
    lr = DEFAULT_LR[estimator] if lr is None else lr
    # Separate streams so that the evaluation contexts are the same for every estimator of a seed and
    # do not depend on how many random numbers training consumed.
    init_g = torch.Generator().manual_seed(seed)
    train_g = torch.Generator(device=device).manual_seed(10_000 + seed)
    eval_seed = 20_000 + seed
    esr = TwoTowerESR(env.num_users, env.num_items, embed_dim, init_std, generator=init_g).to(device)
    opt = torch.optim.Adagrad(esr.parameters(), lr=lr)
    result = RunResult(estimator=estimator, k=k, seed=seed)

    def record(step: int) -> None:
        g = torch.Generator(device=device).manual_seed(eval_seed)
        value = evaluate(esr, env, k, num_picks, lsr=lsr, temperature=temperature, num_contexts=eval_contexts,
                         generator=g)
        result.steps.append(step)
        result.values.append(value)

    record(0)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        reason = train_step(esr, opt, env, estimator=estimator, k=k, num_picks=num_picks, lsr=lsr,
                            temperature=temperature, batch_size=batch_size, generator=train_g,
                            exact_nodes=exact_nodes, exact_top_m=exact_top_m)
        result.train_seconds += time.perf_counter() - t0
        if reason is not None:
            result.stopped_at, result.stop_reason = step, reason
            break
        result.train_steps = step
        if on_step is not None:
            on_step(step)
        if step % eval_every == 0 or step == steps:
            record(step)
    return result


def steps_to_fraction(steps: list[int], values: list[float], target: float) -> int | None:
    """First evaluation step whose value reaches ``target`` (None if never)."""
    for s, v in zip(steps, values):
        if math.isfinite(v) and v >= target:
            return s
    return None
