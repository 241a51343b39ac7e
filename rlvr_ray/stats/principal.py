"""Principal and low-magnitude weight masks, and how a run's update mask overlaps them.

Pure torch. With base W0 [m, n] and the bitwise bf16 update mask M [m, n] of a run:

- W0_k = rank-k SVD reconstruction of W0; M_princ = top alpha of |W0_k|;
- M_low = bottom alpha of |W0|;
- overlap(M*, M) = |M* & M| / |M| (NaN when |M| = 0), whose random baseline is density(M*).

Tie rule (bf16 magnitudes tie very often): a "top alpha" mask holds exactly
``floor(alpha * numel + 0.5)`` entries, ranked by (score descending, flat row-major index
ascending): among entries with equal score the one with the lower flat index is taken first.
"Bottom alpha of |W0|" is the top alpha of -|W0| under the same rule, so ties are again taken in
flat-index order. The selection is O(numel) (one ``kthvalue`` and one ``cumsum``), not a sort.

Which k. A fixed k means different things on different matrices: at k = 64 a 64-wide matrix is
its own rank-k reconstruction (M_princ is then exactly the complement of M_low). The paper
(arXiv 2511.08567) and the work its principal weights come from take k = 64 on matrices
1.5k-4k wide, a few percent of the short side. So k is relative by default: ``rank_for`` gives
k = floor(RANK_FRAC * min(m, n) + 0.5), at least 1, with RANK_FRAC = 0.0417 (~ 64 / 1536: the
paper's k on its 1536-wide 1.5B models; 2048 -> 85, 4096 -> 171, 256 -> 11, 64 -> 3); an
absolute k overrides it (clipped to [1, min(m, n)]).

W0_k is computed in float64; its |entries| rarely tie, but on another device (or BLAS) the last
bits of W0_k may differ, so entries within rounding of the threshold can land on either side.
"""

from __future__ import annotations

import math

import torch

from rlvr_ray.stats.rank_rule import RANK_FRAC, rank_for  # noqa: F401 (re-exported)


def top_fraction_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Float tensor [...] -> BoolTensor [...] holding the top `fraction` of entries by score.

    Exactly floor(fraction * numel + 0.5) entries are selected; ties at the threshold go to the
    lowest flat (row-major) indices. `score` must be free of NaN.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = score.reshape(-1)
    numel = flat.numel()
    count = math.floor(fraction * numel + 0.5)
    if count == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    threshold = torch.kthvalue(flat, numel - count + 1).values  # the count-th largest score
    above = flat > threshold
    tied = flat == threshold
    need = count - int(torch.count_nonzero(above))
    rank = torch.int32 if numel < 2**31 else torch.int64  # half the scratch of int64
    take = tied & (torch.cumsum(tied, 0, dtype=rank) <= need)
    return (above | take).reshape(score.shape)


def low_magnitude_mask(w0: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Base weights [m, n] (any float dtype) -> BoolTensor [m, n]: bottom alpha of |W0|."""
    exact = torch.float32 if w0.dtype in (torch.bfloat16, torch.float16) else torch.float64
    return top_fraction_mask(w0.to(exact, copy=True).abs_().neg_(), alpha)  # one copy


def rank_k_reconstruction(w0: torch.Tensor, v_k: torch.Tensor) -> torch.Tensor:
    """W0 [m, n] and its top right singular vectors v_k [n, k] -> float64 W0_k [m, n].

    W0_k = U_k S_k V_k^T = W0 V_k V_k^T, so the left vectors are not needed.
    """
    w = w0.to(torch.float64)
    return (w @ v_k) @ v_k.T


def principal_mask(w0: torch.Tensor, rank_k: int | None = None, alpha: float = 0.5) -> torch.Tensor:
    """Base weights [m, n] -> BoolTensor [m, n]: top alpha of |W0_k|, k = rank_for(shape, rank_k).

    Standalone form with its own float64 SVD; `base_geometry` reuses its decomposition instead.
    """
    if w0.ndim != 2:
        raise ValueError(f"principal_mask needs a matrix, got shape {tuple(w0.shape)}")
    w = w0.to(torch.float64)
    k = rank_for(tuple(w.shape), rank_k)
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    return top_fraction_mask(rank_k_reconstruction(w, vh[:k].T).abs(), alpha)


def density(mask: torch.Tensor) -> float:
    """BoolTensor [...] -> share of True entries (NaN for an empty tensor)."""
    return int(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else math.nan


def overlap(mask_star: torch.Tensor, mask: torch.Tensor) -> float:
    """BoolTensor [m, n] x2 -> |M* & M| / |M|; NaN when M is empty. Baseline: density(M*)."""
    changed = int(torch.count_nonzero(mask))
    return int(torch.count_nonzero(mask_star & mask)) / changed if changed else math.nan


def mask_overlaps(princ: torch.Tensor, low: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """M_princ, M_low, update mask M (BoolTensor [m, n] each) -> overlaps and their baselines.

    Keys: overlap_princ, overlap_low, overlap_princ_not_low (overlaps with M) and princ_density,
    low_density, princ_not_low_density (the random baselines).
    """
    princ_not_low = princ & ~low
    return {
        "overlap_princ": overlap(princ, mask),
        "overlap_low": overlap(low, mask),
        "overlap_princ_not_low": overlap(princ_not_low, mask),
        "princ_density": density(princ),
        "low_density": density(low),
        "princ_not_low_density": density(princ_not_low),
    }
