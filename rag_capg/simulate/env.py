"""The paper's synthetic two-stage environment (method doc section 3), fully vectorised.

1000 users x 1000 items with 10-dim features, uniform in [-1, 1]^10 and L2-normalised. The expected
reward of item a for user x is

    q(x, a) = scale * x^T [ (1 - eta) M0 + eta M_z(x) ] e_a,
    eta(x, a) = sqrt( sigmoid(w_a . e_a + 3) * sigmoid(w_x . x + 3) ),

with M0 a random projection and M_z one of ``num_latents`` random matrices (rows L2-normalised). Each
user belongs to a hidden latent group z(x), drawn once with the features: the features alone do not
explain the reward, which is why the ESR gets free embeddings rather than the features. The observed
reward is

    r ~ Normal( softplus(q) + 1, sigmoid(x^T W e_a + 1) )        (mean, standard deviation)

so it is about >= 1. A Gaussian can still go below zero in principle (the mean is >= 1 and the std
<= 1, so that is a > 1-sigma event that never happens in practice), and CA-PG requires r >= 0: we clip
at 0, which changes nothing measurable and keeps every estimator valid.

Because the user features (and so the latent group) are fixed, the whole reward table is a (U, N)
matrix computed once; every later step is indexing. A context is a user id drawn uniformly.

The LSR is an oracle on the expected reward q (it sees the latent group; the ESR does not see it but
can learn it in its free embeddings). It picks L of the K candidates:
  optimal: the top-L by q;  noisy: L draws without replacement from softmax(q / temperature);
  uniform: L uniform draws without replacement;  anti: the bottom-L by q (an adversarial LSR).
The policy value of a two-stage system is the mean over contexts of mean_l E[r(x, a_l)], i.e. the
mean of softplus(q) + 1 over the picked items (the expected observed reward: no sampling noise).

Oracle value. For every LSR kind above, the best candidate set for a user is the true top-K by q:
swapping any candidate for a better item can only raise the top-L, the softmax-weighted mean, the
uniform mean and the minimum. So the oracle is the two-stage value of the ESR that retrieves the true
top-K, computed exactly over all users (the context distribution is uniform over users).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from rag_capg.pg.policy import sample_plackett_luce

LSRKind = Literal["optimal", "noisy", "uniform", "anti"]


@dataclass
class SyntheticEnv:
    user_features: torch.Tensor  # (U, d)
    item_features: torch.Tensor  # (N, d)
    user_latent: torch.Tensor  # (U,) long, hidden latent group of each user
    expected: torch.Tensor  # (U, N) q(x, a), what the oracle LSR ranks by
    reward_mean: torch.Tensor  # (U, N) softplus(q) + 1, the mean of the observed reward
    reward_std: torch.Tensor  # (U, N) sigmoid(x^T W e_a + 1)

    @property
    def num_users(self) -> int:
        return self.expected.shape[0]

    @property
    def num_items(self) -> int:
        return self.expected.shape[1]

    def to(self, device: str | torch.device) -> "SyntheticEnv":
        return SyntheticEnv(*(t.to(device) for t in (self.user_features, self.item_features, self.user_latent,
                                                      self.expected, self.reward_mean, self.reward_std)))

    # ----------------------------------------------------------------------------------- contexts
    def sample_users(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.num_users, (n,), generator=generator, device=generator.device).to(
            self.expected.device)

    # ----------------------------------------------------------------------------------- the LSR
    def lsr_pick(self, users: torch.Tensor, lists: torch.Tensor, num_picks: int, *, kind: LSRKind = "optimal",
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Positions (B, L) into ``lists`` (B, K) chosen by the oracle LSR of the given kind."""
        k = lists.shape[1]
        if not 1 <= num_picks <= k:
            raise ValueError(f"num_picks must be in [1, K={k}], got {num_picks}")
        q = self.expected[users.unsqueeze(1), lists]  # (B, K)
        if kind == "optimal":
            return q.topk(num_picks, dim=1).indices
        if kind == "anti":
            return (-q).topk(num_picks, dim=1).indices
        # Stochastic kinds: L draws without replacement from a Plackett-Luce model over the list.
        if kind == "noisy":
            if temperature <= 0:
                raise ValueError(f"the noisy LSR needs temperature > 0, got {temperature}")
            return sample_plackett_luce(q / temperature, num_picks, generator=generator)
        if kind == "uniform":
            return sample_plackett_luce(torch.zeros_like(q), num_picks, generator=generator)
        raise ValueError(f"unknown LSR kind {kind!r}")

    # ----------------------------------------------------------------------------------- rewards
    def observe(self, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Observed rewards (B, L) for picked corpus items (B, L): Normal(mean, std) clipped at 0."""
        u = users.unsqueeze(1)
        noise = torch.randn(items.shape, generator=generator, device=items.device, dtype=self.reward_mean.dtype)
        return (self.reward_mean[u, items] + self.reward_std[u, items] * noise).clamp_min(0.0)

    def two_stage_value(self, users: torch.Tensor, lists: torch.Tensor, num_picks: int, *,
                        kind: LSRKind = "optimal", temperature: float = 1.0,
                        generator: torch.Generator | None = None) -> float:
        """Mean over contexts of mean_l E[r(x, a_l)] when the ESR proposes ``lists`` and the LSR picks."""
        pos = self.lsr_pick(users, lists, num_picks, kind=kind, temperature=temperature, generator=generator)
        picks = lists.gather(1, pos)
        return self.reward_mean[users.unsqueeze(1), picks].mean().item()

    def oracle_value(self, k: int, num_picks: int, *, kind: LSRKind = "optimal", temperature: float = 1.0,
                     generator: torch.Generator | None = None, repeats: int = 20) -> float:
        """Value of the ESR that retrieves the true top-K for every user (the best achievable; see above).

        Exact for the deterministic LSRs; the stochastic ones average ``repeats`` passes over all users.
        """
        users = torch.arange(self.num_users, device=self.expected.device)
        lists = self.expected.topk(k, dim=1).indices
        n = 1 if kind in ("optimal", "anti") else repeats
        return sum(self.two_stage_value(users, lists, num_picks, kind=kind, temperature=temperature,
                                        generator=generator) for _ in range(n)) / n

    def random_value(self, k: int, num_picks: int, *, kind: LSRKind = "optimal", temperature: float = 1.0,
                     generator: torch.Generator, repeats: int = 20) -> float:
        """Value of an ESR that proposes K uniformly random distinct items (a floor for the curves)."""
        users = torch.arange(self.num_users, device=self.expected.device).repeat(repeats)
        u = torch.rand((users.shape[0], self.num_items), generator=generator, device=generator.device)
        lists = u.topk(k, dim=1).indices.to(self.expected.device)
        return self.two_stage_value(users, lists, num_picks, kind=kind, temperature=temperature, generator=generator)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_env(*, num_users: int = 1000, num_items: int = 1000, feature_dim: int = 10, num_latents: int = 10,
             reward_scale: float = 10.0, seed: int = 0) -> SyntheticEnv:
    """Draw the environment (features, M0, M_z, eta, the std map) from ``seed``; float32 on CPU."""
    g = torch.Generator().manual_seed(seed)
    d = feature_dim
    x = _unit_rows(2 * torch.rand(num_users, d, generator=g, dtype=torch.float64) - 1)
    e = _unit_rows(2 * torch.rand(num_items, d, generator=g, dtype=torch.float64) - 1)
    m0 = _unit_rows(torch.randn(d, d, generator=g, dtype=torch.float64))
    mz = _unit_rows(torch.randn(num_latents, d, d, generator=g, dtype=torch.float64))
    z = torch.randint(num_latents, (num_users,), generator=g)
    w_a = torch.randn(d, generator=g, dtype=torch.float64)
    w_x = torch.randn(d, generator=g, dtype=torch.float64)
    w_std = torch.randn(d, d, generator=g, dtype=torch.float64)

    # eta(x, a) = sqrt(sigmoid(w_a . e_a + 3) sigmoid(w_x . x + 3)): how much the hidden latent matters.
    eta = torch.sqrt(torch.sigmoid(x @ w_x + 3).unsqueeze(1) * torch.sigmoid(e @ w_a + 3).unsqueeze(0))
    base = x @ m0 @ e.T  # (U, N): x^T M0 e_a
    latent = torch.einsum("ud,ude->ue", x, mz[z]) @ e.T  # (U, N): x^T M_z(x) e_a
    expected = reward_scale * ((1 - eta) * base + eta * latent)
    reward_mean = F.softplus(expected) + 1.0
    reward_std = torch.sigmoid(x @ w_std @ e.T + 1.0)
    return SyntheticEnv(x.float(), e.float(), z, expected.float(), reward_mean.float(), reward_std.float())
