"""Cross-run consistency of update masks over R runs of one base: consensus and Jaccard.

Pure torch. For R <= JOINT_MAX_RUNS the runs' masks are packed into one integer code per
coordinate and a single bincount gives their joint distribution, from which the consensus
histogram, every pairwise intersection and every mask size follow exactly: O(R) passes instead
of O(R^2) pairwise ANDs. Larger R falls back to pairwise ANDs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from rlvr_ray.stats.masks import bin_edges, block_sizes, pool_vector

JOINT_MAX_RUNS = 12


@dataclass
class ConsistencyStats:
    n_runs: int
    numel: int
    consensus_counts: list[int]  # [c] = coordinates changed by exactly c runs, c = 0..R
    sizes: list[int]  # |M_r|
    intersections: dict[tuple[int, int], int]  # |M_r & M_s|, r < s
    row_consensus: torch.Tensor  # [rows] mean of C_ij over j (float64)
    col_consensus: torch.Tensor  # [cols] mean of C_ij over i
    pooled: torch.Tensor | None  # [map_rows, map_cols] mean consensus per block

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


class ConsistencyAccumulator:
    """Consumes the R runs' masks of a [rows, cols] tensor in consecutive row chunks."""

    def __init__(self, n_runs: int, rows: int, cols: int, device=None,
                 map_col_edges: list[int] | None = None):  # fmt: skip
        self.R, self.rows, self.cols = n_runs, rows, cols
        self.joint = n_runs <= JOINT_MAX_RUNS
        nbins = 2**n_runs if self.joint else n_runs + 1
        self.hist = torch.zeros(nbins, dtype=torch.int64, device=device)
        self.inter = torch.zeros(n_runs, n_runs, dtype=torch.int64, device=device)
        self.row_sum = torch.zeros(rows, dtype=torch.int64, device=device)
        self.col_sum = torch.zeros(cols, dtype=torch.int64, device=device)
        self.map_col_edges = map_col_edges
        self.map_rows: list[torch.Tensor] = []
        self.next_row = 0

    def add(self, masks: list[torch.Tensor]) -> None:
        """The next chunk: R BoolTensors [r, cols], one per run, same rows."""
        r0, r = self.next_row, masks[0].shape[0]
        if self.joint:
            dt = torch.int16 if self.R < 16 else torch.int32
            code = torch.zeros(masks[0].shape, dtype=dt, device=masks[0].device)
            for i, m in enumerate(masks):
                code |= m.to(dt) << i
            self.hist += torch.bincount(code.flatten().to(torch.int64), minlength=len(self.hist))
            count = torch.zeros_like(code, dtype=torch.uint8)
            for m in masks:
                count += m
        else:
            count = torch.zeros(masks[0].shape, dtype=torch.uint8, device=masks[0].device)
            for m in masks:
                count += m
            self.hist += torch.bincount(count.flatten().to(torch.int64), minlength=self.R + 1)
            for a, b in combinations(range(self.R), 2):
                self.inter[a, b] += (masks[a] & masks[b]).sum()
            for a, m in enumerate(masks):
                self.inter[a, a] += m.sum()
        self.row_sum[r0 : r0 + r] = count.sum(1, dtype=torch.int64)
        col = count.sum(0, dtype=torch.int64)
        self.col_sum += col
        if self.map_col_edges is not None:
            self.map_rows.append(pool_vector(col, self.map_col_edges))
        self.next_row += r

    def finish(self) -> ConsistencyStats:
        if self.next_row != self.rows:
            raise ValueError(f"saw {self.next_row} of {self.rows} rows")
        R, hist = self.R, self.hist.cpu()
        if self.joint:
            codes = torch.arange(len(hist))
            bits = torch.stack([(codes >> i) & 1 for i in range(R)])  # [R, 2^R]
            counts = torch.zeros(R + 1, dtype=torch.int64).index_add_(0, bits.sum(0), hist)
            inter = (bits[:, None, :] * bits[None, :, :] * hist).sum(-1)  # [R, R]
        else:
            counts, inter = hist, self.inter.cpu()
        pooled = None
        if self.map_col_edges is not None:
            block = block_sizes(bin_edges(self.rows, len(self.map_rows)), self.map_col_edges)
            pooled = torch.stack(self.map_rows).cpu() / (block * R)
        return ConsistencyStats(
            n_runs=R,
            numel=self.rows * self.cols,
            consensus_counts=[int(x) for x in counts.tolist()],
            sizes=[int(inter[i, i]) for i in range(R)],
            intersections={(a, b): int(inter[a, b]) for a, b in combinations(range(R), 2)},
            row_consensus=self.row_sum.to(torch.float64) / (R * self.cols),
            col_consensus=self.col_sum.to(torch.float64) / (R * self.rows),
            pooled=pooled,
        )


def consistency(masks: list[torch.Tensor]) -> ConsistencyStats:
    """Whole-tensor form: R BoolTensors [m, n] -> ConsistencyStats."""
    m2 = [m.reshape(m.shape[0], -1) if m.dim() > 1 else m.reshape(1, -1) for m in masks]
    acc = ConsistencyAccumulator(len(m2), *m2[0].shape, device=m2[0].device)
    acc.add(m2)
    return acc.finish()
