"""The statistics' records and their integer arithmetic, without torch.

``MaskStats`` and ``ConsistencyStats`` are what both mask passes return: the torch path
(``rlvr_ray.stats.masks``, ``rlvr_ray.stats.consistency``) and the fused CPU pass
(``rlvr_ray.stats.group``), which runs on numpy arrays and so scans a bf16 tensor without
importing torch. Their vectors are float64 on the CPU: numpy arrays from the fused pass, torch
tensors from the torch path, the same numbers either way (an int64 count converted to float64
and divided once, which numpy and torch round alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

#: a float64 (or int64 count) vector or grid on the CPU
Vector = Union[np.ndarray, "torch.Tensor"]

#: up to this many runs in a consensus, the 2^R pattern histogram is counted; beyond, M M^T
HIST_RUNS = 16

#: float32 holds every integer up to 2^24: the most 0/1 values one float32 sum may cover
EXACT_NUMEL = 1 << 24


def gini_counts(counts: np.ndarray) -> float | None:
    """Gini coefficient of non-negative integer counts [n] (0: even, -> 1: all in one entry).

    The stripe score: how concentrated a mask's changes are in few rows (columns); the Gini of
    the row (column) ratios, which does not depend on their scale. Exact: sorted by counting,
    the sum of ranks x values in integers, one correctly rounded division. None if all zero.
    """
    c = np.asarray(counts, dtype=np.int64).ravel()
    n, total = c.size, int(c.sum())
    if n == 0 or total <= 0:
        return None
    h = np.bincount(c)
    v = np.nonzero(h)[0]
    hv = h[v]
    start = np.cumsum(hv) - hv  # values below v: ranks start + 1 .. start + hv hold v
    # sum of ranks x values = sum_v v * hv * (2 start + hv + 1) / 2 <= n x total: in int64
    # where that fits, else in Python ints (object arrays) from the first product on
    if n * total >= 1 << 62:
        v, hv, start = v.astype(object), hv.astype(object), start.astype(object)
    s = int((v * hv * (2 * start + hv + 1)).sum()) // 2
    return (2 * s - (n + 1) * total) / (n * total)


def bin_edges(size: int, bins: int) -> list[int]:
    """Edges of ``bins`` near-equal contiguous bins over ``size`` items (bins <= size)."""
    return [i * size // bins for i in range(bins + 1)]


@dataclass
class MaskStats:
    """Per (run, tensor) mask statistics; ratios are float64 CPU vectors (divided on the CPU,
    so that every device writes the same bits): numpy arrays from the fused CPU pass, torch
    tensors from the torch path, equal element for element."""

    numel: int
    n_changed: int
    row_counts: np.ndarray  # int64 [rows]: changed per row
    col_counts: np.ndarray  # int64 [cols]: changed per column
    row_ratio: Vector  # [rows]: rho_i = mean_j M_ij
    col_ratio: Vector  # [cols]: kappa_j = mean_i M_ij
    ulp_hist: list[int]  # counts per bin of ``edges``
    ulp1: int
    ulp_max: int
    update_sumsq: float
    max_abs_update: float
    pooled: Vector | None  # [map_rows, map_cols] pooled density, if asked for

    @property
    def update_density(self) -> float:
        return self.n_changed / self.numel if self.numel else float("nan")

    @property
    def ulp1_share(self) -> float | None:
        return self.ulp1 / self.n_changed if self.n_changed else None


@dataclass
class ConsistencyStats:
    n_runs: int
    numel: int
    consensus_counts: list[int]  # [c] = coordinates changed by exactly c runs, c = 0..R
    sizes: list[int]  # |M_r|
    intersections: dict[tuple[int, int], int]  # |M_r & M_s|, r < s
    row_consensus: Vector  # [rows] mean of C_ij over j (float64)
    col_consensus: Vector  # [cols] mean of C_ij over i
    pooled: Vector | None  # [map_rows, map_cols] mean consensus per block

    def _pairs(self):
        for (r, s), inter in self.intersections.items():
            union = self.sizes[r] + self.sizes[s] - inter
            if union:
                yield r, s, inter / union

    @property
    def mean_jaccard(self) -> float | None:
        """Mean over run pairs of |A & B| / |A | B| (pairs with an empty union left out)."""
        vals = [j for _, _, j in self._pairs()]
        return sum(vals) / len(vals) if vals else None

    @property
    def jaccard_baseline(self) -> float | None:
        """Mean over the same pairs of pq / (p + q - pq): independent Bernoulli masks."""
        vals = []
        for r, s, _ in self._pairs():
            p, q = self.sizes[r] / self.numel, self.sizes[s] / self.numel
            vals.append(p * q / (p + q - p * q))
        return sum(vals) / len(vals) if vals else None


def counts_from_hist(h: np.ndarray, R: int) -> tuple[list[int], np.ndarray]:
    """A histogram of the 2^R member patterns (int64) -> (consensus counts [R + 1],
    intersections int64 [R, R] with the sizes on the diagonal)."""
    bits = (np.arange(1 << R)[:, None] >> np.arange(R)) & 1  # [2^R, R]: runs in a pattern
    # float64 BLAS is exact here: integer terms and sums below numel < 2^53
    inter = np.rint((bits * h[:, None].astype(np.float64)).T @ bits).astype(np.int64)
    counts = np.zeros(R + 1, dtype=np.int64)
    np.add.at(counts, bits.sum(1), h)
    return [int(x) for x in counts], inter


def stats_from_counts(
    R: int,
    rows: int,
    cols: int,
    counts: list[int],
    inter: np.ndarray,
    row_sum: Vector,
    col_sum: Vector,
    pooled_sum: Vector | None = None,
    block: Vector | None = None,
) -> ConsistencyStats:
    """ConsistencyStats from the consensus counts, the intersections (sizes on the diagonal)
    and the members' summed row / column / pooled counts (numpy arrays or torch tensors; the
    profiles come back as the same kind, on the CPU)."""
    return ConsistencyStats(
        n_runs=R,
        numel=rows * cols,
        consensus_counts=counts,
        sizes=[int(inter[i, i]) for i in range(R)],
        intersections={(a, b): int(inter[a, b]) for a, b in combinations(range(R), 2)},
        row_consensus=_float64(row_sum) / (R * cols),
        col_consensus=_float64(col_sum) / (R * rows),
        pooled=pooled_sum / (block * R) if pooled_sum is not None else None,
    )


def _float64(x: Vector) -> Vector:
    """Counts (int64, any device) -> float64 on the CPU, of the same kind."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.cpu().double()
