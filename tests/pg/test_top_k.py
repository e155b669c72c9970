"""top_k_indices is torch.topk's sorted indices, by a numba selection kernel on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rag_capg.pg import top_k as tk
from rag_capg.pg.top_k import top_k_indices


def stable_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force with the documented tie rule: sort by value descending, equal values by index."""
    order = np.lexsort((np.arange(x.shape[1])[None, :].repeat(x.shape[0], 0), -x.numpy()), axis=1)
    return torch.from_numpy(order[:, :k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 20, 32, 33, 64, 65, 200])
def test_same_as_torch_topk(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(16, 8, generator=g) @ torch.randn(8, 200, generator=g)).to(dtype)
    x[0, :10] = float("-inf")
    assert torch.equal(top_k_indices(x, k), torch.topk(x, k, dim=1).indices)


@pytest.mark.parametrize("n, k", [(n, k) for n in (7, 20, 21, 99, 1000) for k in (1, 2, 7, 20, 64) if k <= n])
def test_many_ties_follow_the_stable_order(n, k):
    """Few distinct values (every k-th place is a tie), rows sorted, reversed and shuffled, N not a
    multiple of k, k = N: the kernel's lanes and survivor pass must never drop a top-k entry."""
    g = torch.Generator().manual_seed(n * 100 + k)
    rows = [torch.randint(0, 4, (n,), generator=g).double(), torch.arange(n).double(),
            torch.arange(n).flip(0).double(), torch.full((n,), 2.0), torch.randn(n, generator=g)]
    rows[-1][::3] = float("-inf")
    x = torch.stack(rows)
    assert torch.equal(top_k_indices(x, k), stable_top_k(x, k))
    assert torch.equal(top_k_indices(x.float(), k), stable_top_k(x.float(), k))


def test_ties_go_to_the_earlier_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.5]])
    assert top_k_indices(x, 2).tolist() == [[1, 2]]
    assert top_k_indices(x, 4).tolist() == [[1, 2, 4, 3]]
    assert top_k_indices(torch.zeros(2, 5), 3).tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("nan_at", [0, 7, 49])
def test_nan_rows_and_other_inputs_fall_back_to_torch(nan_at):
    x = torch.randn(4, 50)
    x[2, nan_at] = float("nan")  # at a lane start (0), inside a lane, in the last place
    assert torch.equal(top_k_indices(x, 5), torch.topk(x, 5, dim=1).indices)
    ints = torch.randint(0, 1000, (3, 40))
    assert torch.equal(ints.gather(1, top_k_indices(ints, 4)), ints.topk(4, dim=1).values)


def test_values_ordered_and_no_gradient():
    x = torch.randn(8, 100, requires_grad=True)
    idx = top_k_indices(x, 10)
    vals = x.detach().gather(1, idx)
    assert not idx.requires_grad and bool((vals[:, :-1] >= vals[:, 1:]).all())
    assert tk._MAX_KERNEL_K >= 20  # the candidate sizes of the synthetic benchmark use the kernel
