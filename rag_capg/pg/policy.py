"""The early-stage ranker as a Plackett-Luce (PL) policy over a corpus: sampling and log-probabilities.

Every function takes a batch of logit vectors ``logits`` of shape (B, N) (one row per query, one column per
corpus item) and works on any device. Item weights are ``w_j = exp(s_j)``; ``p = softmax(s)``.

* A PL list S = (c_1, ..., c_K) is drawn without replacement: c_k is chosen among the items not yet drawn
  with probability proportional to w. Its log-likelihood is

      log pi(S) = sum_k [ s_{c_k} - log D_k ],   D_k = sum_{j not in c_1..c_{k-1}} w_j.

  The textbook form D_k = exp(Z) - sum_{j<k} w_{c_j} (Z = logsumexp(s)) cancels catastrophically once the
  first few items hold nearly all the mass (a peaked policy). We use the equivalent *suffix* form

      D_k = W_rest + sum_{j >= k} w_{c_j},   W_rest = sum of the weights of the items not in S,

  a sum of positive terms, evaluated in log space with one reversed ``logcumsumexp`` over the K list
  logits and one masked ``logsumexp`` over the corpus. No Python loop over positions, no cancellation.

* Sampling uses the Gumbel top-k trick: the top-k of ``s + Gumbel noise`` is an exact PL sample, ordered.
  The noise is ``-log(-log U)``, U ~ Uniform[0, 1) from ``torch.rand``, with U clamped to the smallest
  normal float so that U = 0 (probability 2^-24 per entry in float32) cannot give -inf. (The same
  Gumbel(0, 1) as ``-log(E)``, E ~ Exp(1), but torch's ``exponential_`` is much slower on CPU.)
  Every top-k goes through ``rag_capg.pg.top_k.top_k_indices``: ``torch.topk``'s result, by a faster
  selection kernel on CPU.

Half-precision inputs are upcast to float32; log-probabilities are returned in the (upcast) input dtype.
"""

from __future__ import annotations

import math

import torch

from rag_capg.pg.top_k import top_k_indices

__all__ = [
    "sample_plackett_luce",
    "deterministic_top_k",
    "plackett_luce_log_prob",
    "with_replacement_log_prob",
    "item_log_prob",
    "kl_to_reference",
    "entropy",
]


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (B, N) tensor, got shape {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _check_index(logits: torch.Tensor, index: torch.Tensor, name: str) -> None:
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[0] != logits.shape[0]:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"{name} must be a (B, *) index tensor with B={logits.shape[0]} rows "
                         f"(like logits {tuple(logits.shape)}), got shape {shape}")
    if index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer corpus indices, got {index.dtype}")
    if index.numel():
        low, high = torch.stack(torch.aminmax(index)).tolist()  # one host-device sync, not two
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(f"{name} holds indices outside [0, {logits.shape[1]}): min {low}, max {high}")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Never compute normalisers in half precision: exp/log of 16-bit floats lose everything."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _masked_logits(logits: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits with disallowed items set to -inf, after checking that every row has >= k drawable items."""
    allowed = logits > float("-inf")  # an item of weight exp(-inf) = 0 can never be drawn either (nor NaN)
    if mask is not None:
        if mask.shape != logits.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(logits.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        allowed = allowed & ~mask
    n_allowed = allowed.sum(dim=1)
    if bool((n_allowed < k).any()):
        row = int(torch.argmin(n_allowed))
        raise ValueError(f"cannot draw k={k} items: row {row} has only {int(n_allowed[row])} allowed "
                         f"(unmasked, finite-logit) items")
    return logits.masked_fill(~allowed, float("-inf"))


def _top_k_allowed(s: torch.Tensor, k: int, mask: torch.Tensor | None,
                   neg_noise: torch.Tensor | None) -> torch.Tensor:
    """Top-k of ``s - neg_noise`` (or of s) among the allowed items: unmasked, logit > -inf, not NaN.

    Without a mask, the top-k of the raw scores is already the answer whenever every chosen item has a
    logit > -inf (then the row has >= k drawable items and no NaN, which top-k would rank first), so the
    masked copy of the (B, N) logits, a third of a synthetic-benchmark sampling call, is made only when
    that check fails or a mask is given; the masked path also raises the error for too few items."""
    _check_logits(s)
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be in [1, N={s.shape[1]}], got {k}")
    if mask is None:
        idx = top_k_indices(s if neg_noise is None else s - neg_noise, k)
        if bool((s.gather(1, idx) > float("-inf")).all()):  # one host sync; NaN fails it too
            return idx
    s = _masked_logits(s, k, mask)
    return top_k_indices(s if neg_noise is None else s - neg_noise, k)


def uniform_noise(shape: tuple[int, int], *, dtype: torch.dtype, device, generator=None) -> torch.Tensor:
    """U ~ Uniform[0, 1) of ``shape``. ``generator`` is one torch.Generator, None, or a sequence of n
    generators: then the rows are split into n equal blocks and block i is drawn with generator i, so a
    row's noise depends only on its own generator (the trainer gives each query one, whatever the batch)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, dtype=dtype, device=device, generator=generator)
    blocks = list(generator)
    if not blocks or shape[0] % len(blocks):
        raise ValueError(f"{len(blocks)} generators cannot split {shape[0]} rows into equal blocks")
    per = shape[0] // len(blocks)
    return torch.cat([torch.rand((per, *shape[1:]), dtype=dtype, device=device, generator=g) for g in blocks])


@torch.no_grad()
def sample_plackett_luce(logits: torch.Tensor, k: int, *, mask: torch.Tensor | None = None,
                         generator=None) -> torch.Tensor:
    """Draw one ordered PL list of k distinct items per row by Gumbel top-k. Returns LongTensor (B, k).

    ``mask`` (bool, (B, N), True = may not be drawn) removes items from the draw; it is an error if a row
    has fewer than k allowed items. ``generator`` (on the logits' device; one, or one per equal block of
    rows, see ``uniform_noise``) makes the draw reproducible.
    """
    s = _upcast(logits.detach())  # (checked by _top_k_allowed, before anything is drawn from it)
    # -log(-log U) is Gumbel(0, 1); top-k of the perturbed scores, sorted, is a PL sample.
    u = uniform_noise(tuple(s.shape), dtype=s.dtype, device=s.device, generator=generator)
    return _top_k_allowed(s, k, mask, u.clamp_min_(torch.finfo(s.dtype).tiny).log_().neg_().log_())


@torch.no_grad()
def deterministic_top_k(logits: torch.Tensor, k: int, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The k highest-logit allowed items per row, best first (the ESR at evaluation). LongTensor (B, k)."""
    return _top_k_allowed(logits.detach(), k, mask, None)


def _negligible_log_weight(dtype: torch.dtype) -> float:
    """Log-weight, relative to a row's maximum, below which an item is dropped from sums of exp: 20 nats above
    log(smallest normal float), i.e. -67.3 in float32 (2e-29) and -688.4 in float64.

    Why drop anything: torch's vectorised CPU exp falls back to a scalar path for inputs near and below
    log(smallest normal), two orders of magnitude slower per element, and a sharp policy (a logit range of a
    few hundred, as the synthetic benchmark reaches at high learning rates) puts most of the corpus there.
    And weights that small turn into subnormal numbers in the gradient (weight x incoming gradient), which
    slow the matmul of the backward pass (eval/RESULTS.md, "Step time per estimator").
    Why it is safe: such a weight is 50 nats below float32's resolution of any sum that holds the maximum."""
    return math.log(torch.finfo(dtype).tiny) + 20.0


def _min_exact_mass(dtype: torch.dtype, n: int) -> float:
    """Smallest sum of ``_exp_or_zero`` weights (relative to the row maximum) that the dropped ones cannot
    disturb: n dropped items weigh at most n exp(floor), which must stay below the dtype's resolution of the
    sum. Below it (kept items all far below an excluded maximum) callers take an exact path instead."""
    return n * math.exp(_negligible_log_weight(dtype)) / torch.finfo(dtype).eps


def _exp_or_zero(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for logits minus their row maximum, with the entries below ``_negligible_log_weight`` set to 0 on
    CPU (a GPU's exp has no slow lanes, and a host sync would stall it: plain exp there). Costs one
    reduction and one host sync when nothing is that low. In place when x needs no gradient."""
    floor = _negligible_log_weight(x.dtype)
    if x.device.type != "cpu" or not bool(x.detach().amin() < floor):  # NaN compares false either way
        return x.exp() if x.requires_grad else x.exp_()
    keep = x >= floor
    # zeroed by a multiply: masked_fill_ is a data-dependent scalar loop here
    if x.requires_grad:
        return x.clamp_min(floor).exp() * keep
    return x.clamp_min_(floor).exp_().mul_(keep)


def _raise_far_below_max(s: torch.Tensor) -> torch.Tensor:
    """s with every logit more than ``-_negligible_log_weight`` - log N nats below its row maximum raised to
    that level, for torch.logsumexp: its forward takes exp(s - max) and its backward exp(s - logsumexp), up
    to log N lower, and neither should meet exp's slow lanes. The raised items weigh < N * 2e-29 of the
    maximum (float32): the normaliser moves by at most N^2 times that, and their gradient, as small, stays
    as small (``_RaiseTo`` passes it through as taken at the raised value, because the backward of
    ``torch.maximum`` costs more than the whole logsumexp). Costs two reductions and one host sync when no
    row spans that range. CPU only, like ``_exp_or_zero``."""
    if s.device.type != "cpu":
        return s
    floor = s.amax(dim=1, keepdim=True).detach() + (_negligible_log_weight(s.dtype) + math.log(max(s.shape[1], 1)))
    if not bool((s.detach().amin(dim=1, keepdim=True) < floor).any()):
        return s
    return _RaiseTo.apply(s, floor)


class _RaiseTo(torch.autograd.Function):
    """max(s, floor) forward, identity backward (see ``_raise_far_below_max``)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        return torch.maximum(s, floor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _LogSumExpExcluding(torch.autograd.Function):
    """log sum_{j not in index[b]} exp(s_bj) in one exp pass over (B, N) for forward and backward together.

    With m = max_j s_bj and e = exp(s - m) zeroed at ``index``: value m + log sum(e), gradient e / sum(e)
    (the softmax of the kept entries, stored as such: scaling the incoming gradient by 1 / sum(e) first
    overflowed to inf when the kept mass was subnormal, which stopped V-PG at learning rate 1 after 178
    steps of the synthetic benchmark). Autograd through ``logsumexp(s.scatter(...))`` costs two exp passes,
    a copy and a fill of the (B, N) logits, which made this the largest part of CA-PG's extra time over TOP1.
    Also returns the kept mass sum(e): where it is below ``_min_exact_mass`` (the kept entries all lie ~40+
    nats below an excluded maximum in float32, or nothing is kept) the caller takes the exact path,
    relative to the kept entries' own maximum."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, index: torch.Tensor):
        m = s.amax(dim=1, keepdim=True)
        e = _exp_or_zero(s - m).scatter_(1, index, 0.0)
        total = e.sum(dim=1)
        ctx.save_for_backward(e.div_(total[:, None]))  # rows with total 0 are not used: the caller falls back
        return m.squeeze(1) + total.log(), total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, _grad_total):
        (softmax,) = ctx.saved_tensors
        return softmax * grad_value[:, None], None


def _logsumexp_excluding(s: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log sum_{j not in index[b]} exp(s_bj), shape (B,). Rows where nothing is left give a huge negative
    finite number rather than -inf, so that autograd never meets exp(-inf - -inf) = NaN."""
    value, total = _LogSumExpExcluding.apply(s, index)
    if bool((total >= _min_exact_mass(s.dtype, s.shape[1])).all()):  # one host sync; almost always true
        return value
    # a sharp policy lands here for V-PG's never-drawn mass; the raise keeps torch's exp off its slow lanes
    very_negative = torch.finfo(s.dtype).min / 4
    return torch.logsumexp(_raise_far_below_max(s.scatter(1, index, very_negative)), dim=1)


def plackett_luce_log_prob(logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Ordered PL log-likelihood log pi(S) of each row's list (B, K) of distinct items. Returns (B,).

    Differentiable w.r.t. logits. Suffix form of the normalisers (see the module docstring):
    log D_k = logaddexp(log W_rest, logcumsumexp of the list logits taken from the end).
    """
    _check_logits(logits)
    _check_index(logits, lists, "lists")
    s = _upcast(logits)
    s_list = s.gather(1, lists)  # (B, K)
    log_rest = _logsumexp_excluding(s, lists)  # (B,) mass of the items never drawn
    # suffix[k] = log sum_{j >= k} w_{c_j}: reverse, cumulative logsumexp, reverse back.
    suffix = torch.logcumsumexp(s_list.flip(1), dim=1).flip(1)
    log_denominators = torch.logaddexp(suffix, log_rest[:, None])
    return (s_list - log_denominators).sum(dim=1)


def with_replacement_log_prob(logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """sum_k log softmax(s)_{c_k}: the list read as K independent draws with replacement (V-PG-SwR). (B,)"""
    return item_log_prob(logits, lists).sum(dim=1)


def item_log_prob(logits: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """log softmax(s) at the given items (B, L) -> (B, L). (TOP1 / CA-PG-SwR's per-item term.)"""
    _check_logits(logits)
    _check_index(logits, items, "items")
    s = _upcast(logits)
    return s.gather(1, items) - torch.logsumexp(_raise_far_below_max(s), dim=1, keepdim=True)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || p0) per row, (B,), with p = softmax(logits), p0 = softmax(ref_logits) over the same items:
    sum_j p_j (s_j - s0_j) - (Z - Z0), Z = logsumexp(s). Its gradient w.r.t. s_k is
    p_k ((s_k - s0_k) - sum_j p_j (s_j - s0_j)); autograd computes it through log_softmax. The penalty that
    keeps a trained policy near its start (TRL's ``beta``; method doc section 5). ``ref_logits`` is a
    constant. Computed in float32 or wider."""
    _check_logits(logits)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} must match logits {tuple(logits.shape)}")
    log_p = torch.log_softmax(_upcast(logits), dim=1)
    log_p0 = torch.log_softmax(_upcast(ref_logits.detach()).to(log_p.dtype), dim=1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_p0), torch.zeros_like(p)).sum(dim=1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(s) per row, (B,), for logging. Items at -inf contribute 0."""
    _check_logits(logits)
    log_p = torch.log_softmax(_upcast(logits), dim=1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)
