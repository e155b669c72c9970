"""Indices of the k largest entries of each row, best first: ``torch.topk(x, k, dim=1).indices``.

On CPU, for float32 / float64 rows, a numba kernel does it in three short passes per row:

1. A lower bound tau on the k-th largest value. Split the row into k disjoint interleaved lanes
   (entries j, j + k, j + 2k, ...) and take each lane's maximum: that is k distinct entries, so at
   least k entries are >= tau = the smallest lane maximum, hence the k-th largest value is >= tau.
   The lane loop is an elementwise max over k contiguous entries at a time, which the compiler
   vectorises (a running max over contiguous blocks would be a serial reduction).
2. Collect the entries >= tau (and NaNs, which compare false with everything). For N = 1,000 and k = 20
   about 70 survive.
3. Insertion-sort the survivors into the k best, in index order, so that equal values keep the earlier
   index first.

It serves every top-K of a training step (the Gumbel top-K sample, the deterministic top-K of CA-PG's
approximation); its speed against ``torch.topk`` is in eval/RESULTS.md. The bound loosens as k grows
(lanes get shorter, more entries survive, and each insertion shifts up to k entries), so past k = 64
``torch.topk`` is used.

Ties: the earlier index wins, both at the k-th place and in the order of the result (``torch.topk``
leaves the order of equal values unspecified). Rows holding NaN, other dtypes, other devices, or a
missing numba fall back to ``torch.topk``.
"""

from __future__ import annotations

import torch

__all__ = ["top_k_indices"]

try:  # numba is a dependency; the torch path stands in when it is missing
    import numba
    import numpy as np

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False


if _HAVE_NUMBA:

    @numba.njit(cache=True, nogil=True)
    def _top_k_rows(x, k, out):  # pragma: no cover - compiled
        """Write each row's top-k indices (best first) into out (B, k); return False if a NaN was seen."""
        B, N = x.shape
        lane_max = np.empty(k, dtype=x.dtype)
        cand_val = np.empty(N, dtype=x.dtype)
        cand_idx = np.empty(N, dtype=np.int64)
        best_val = np.empty(k, dtype=x.dtype)
        best_idx = np.empty(k, dtype=np.int64)
        for b in range(B):
            # 1. tau = min over k interleaved lanes of the lane maximum. A NaN never replaces a lane
            #    maximum and is skipped by the min; pass 2 lets every NaN through to be caught in pass 3.
            for j in range(k):
                lane_max[j] = x[b, j]
            for start in range(k, N - k + 1, k):
                for j in range(k):
                    v = x[b, start + j]
                    lane_max[j] = v if v > lane_max[j] else lane_max[j]
            tau = lane_max[0]
            for j in range(1, k):
                tau = lane_max[j] if lane_max[j] < tau else tau
            # 2. the survivors, in index order (NaN < tau is false: NaNs survive). Branch-free: every entry is
            #    written and only a survivor moves the count (few survive, so a branch would mispredict on
            #    each of them)
            count = 0
            for i in range(N):
                v = x[b, i]
                cand_val[count] = v
                cand_idx[count] = i
                count += not v < tau
            # 3. insertion into best_val (descending); a survivor equal to a kept value goes after it
            filled = 0
            for c in range(count):
                v = cand_val[c]
                if v != v:
                    return False
                if filled == k and not v > best_val[k - 1]:
                    continue
                pos = filled if filled < k else k - 1
                while pos > 0 and v > best_val[pos - 1]:  # shift the worse ones down (the k-th falls off)
                    best_val[pos] = best_val[pos - 1]
                    best_idx[pos] = best_idx[pos - 1]
                    pos -= 1
                best_val[pos] = v
                best_idx[pos] = cand_idx[c]
                if filled < k:
                    filled += 1
            for i in range(k):
                out[b, i] = best_idx[i]
        return True


_MAX_KERNEL_K = 64  # beyond this the lower bound is too loose and torch.topk's partial sort is faster


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.topk(x, k, dim=1, sorted=True).indices`` for a (B, N) tensor (no gradient)."""
    x = x.detach()
    if (_HAVE_NUMBA and x.device.type == "cpu" and x.dim() == 2 and x.dtype in (torch.float32, torch.float64)
            and 1 <= k <= min(_MAX_KERNEL_K, x.shape[1])):
        out = np.empty((x.shape[0], k), dtype=np.int64)
        if _top_k_rows(x.contiguous().numpy(), k, out):
            return torch.from_numpy(out)
    return torch.topk(x, k, dim=1, sorted=True).indices
