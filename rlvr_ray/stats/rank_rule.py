"""Which k the geometry statistics use on a matrix: the rank rule, as plain arithmetic.

A fixed k means different things on different matrices: at k = 64 a 64-wide matrix is its own
rank-k reconstruction. The paper (arXiv 2511.08567) and the work its principal weights come from
take k = 64 on matrices 1.5k-4k wide, a few percent of the short side, so k is relative by
default (see `rlvr_ray.stats.principal`). No torch here: the sweep's parameters and the memory
estimate use it before any tensor exists.
"""

from __future__ import annotations

import math

#: default k as a share of a matrix's short side (see the module docstring)
RANK_FRAC = 0.0417


def rank_for(shape: tuple[int, ...], k: int | None = None, frac: float = RANK_FRAC) -> int:
    """Matrix shape (m, n) -> the k used for it: the absolute ``k`` when given, else
    floor(frac * min(m, n) + 0.5); either way clipped to [1, min(m, n)]."""
    p = min(shape)
    if k is None:
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"rank fraction must be in (0, 1], got {frac}")
        k = math.floor(frac * p + 0.5)
    return max(1, min(k, p))
