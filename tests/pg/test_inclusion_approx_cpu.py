"""The fused CPU approximation equals the torch reference (values and gradients) and finite differences.

The reference is ``inclusion._log_one_minus_approx_torch`` (plain torch under autograd; log P taken as
log(-expm1(.)) of it), itself checked against a naive re-implementation of the paper's formula in
tests/test_inclusion.py.
"""

from __future__ import annotations

import pytest
import torch

from rag_capg.pg import inclusion
from rag_capg.pg.inclusion_approx_cpu import approx_inclusion_cpu
from rag_capg.pg.top_k import top_k_indices


def both(s: torch.Tensor, items: torch.Tensor, k: int, grad_weights: torch.Tensor, log_p: bool):
    """(value, gradient) of sum(grad_weights * value), value = log P or log(1 - P), by the fused path and by
    the reference."""
    out = []
    for fused in (True, False):
        x = s.clone().requires_grad_(True)
        top = top_k_indices(x, k)
        if fused:
            value = approx_inclusion_cpu(x, top, items, log_p=log_p)
        else:
            value = inclusion._log_one_minus_approx_torch(x, top, items, k)
            value = torch.log(-torch.expm1(value)) if log_p else value
        assert value is not None
        (grad,) = torch.autograd.grad((grad_weights * value).sum(), x)
        out.append((value.detach(), grad))
    return out


@pytest.mark.parametrize("log_p", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k, num_picks", [(1, 1), (5, 1), (20, 1), (20, 5), (64, 3)])
def test_fused_equals_the_torch_reference(dtype, k, num_picks, log_p):
    g = torch.Generator().manual_seed(k * 10 + num_picks)
    B, N = 16, 300
    s = (torch.randn(B, N, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    # picks from the row's top-K and from far below it, in the same row, plus repeated picks
    top = top_k_indices(s, k)
    items = torch.where(torch.rand(B, num_picks, generator=g) < 0.5,
                        top.gather(1, torch.randint(0, k, (B, num_picks), generator=g)),
                        torch.randint(0, N, (B, num_picks), generator=g))
    items[0] = top[0, 0]
    weights = torch.rand(B, num_picks, generator=g, dtype=torch.float64)
    (v_fused, g_fused), (v_ref, g_ref) = both(s, items, k, weights, log_p)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(v_fused, v_ref, atol=tol, rtol=tol)
    assert g_fused.dtype == dtype
    torch.testing.assert_close(g_fused, g_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("log_p", [True, False])
def test_fused_gradient_matches_finite_differences(log_p):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 12, generator=g, dtype=torch.float64) * 2
    k = 4
    items = torch.stack((top_k_indices(s, k)[:, 1], top_k_indices(s, 10)[:, 9]), dim=1)

    def f(x):
        return approx_inclusion_cpu(x, top_k_indices(x, k), items, log_p=log_p)

    assert torch.autograd.gradcheck(f, (s.requires_grad_(True),), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("log_p", [True, False])
def test_a_tail_far_below_the_top_k_is_weighed_exactly(log_p):
    # Row 0's tail sits 200-300 nats below its top-2: exp(s - max) is 0 in float32, so the fused path weighs
    # it from its own maximum. Float32 logits against the float64 torch reference on the same values.
    s = torch.tensor([[0.0, -1.0, -200.0, -300.0, -250.0], [0.0, 1.0, 2.0, 3.0, 2.5], [5.0, -60.0, -61.0, -75.0, 4.0]])
    items = torch.tensor([[1, 2], [0, 3], [4, 1]])
    k = 2
    x = s.clone().requires_grad_(True)
    got = approx_inclusion_cpu(x, top_k_indices(x, k), items, log_p=log_p)
    assert got is not None
    (grad,) = torch.autograd.grad(got.sum(), x)
    y = s.double().requires_grad_(True)
    want = inclusion._log_one_minus_approx_torch(y, top_k_indices(y, k), items, k)
    want = torch.log(-torch.expm1(want)) if log_p else want
    (want_grad,) = torch.autograd.grad(want.sum(), y)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
    # log(1 - P): relative, down to the tail items' ~1e-29 gradients of row 2 (row 0's, ~1e-87, are 0 in
    # float32). log P of row 2's top pick: 1 - P ~ e^-64, so its gradient is ~1e-28, which the reference's
    # log(-expm1(.)) rounds to 0 and the fused path keeps: compared in absolute terms.
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-27 if log_p else 1e-35, rtol=1e-4)


def test_full_list_falls_back_to_the_reference():
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert approx_inclusion_cpu(s, top_k_indices(s, 4), torch.tensor([[0]]), log_p=True) is None  # K = N
    x = s.clone().requires_grad_(True)
    got = inclusion.log_inclusion_prob(x, torch.tensor([[2]]), 4)
    assert float(got.detach()) == 0.0  # the list holds every item
