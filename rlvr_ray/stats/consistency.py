"""Cross-run consistency of update masks over R runs of one base: consensus and Jaccard.

Pure torch. A chunk's R masks are stacked as a float32 matrix M [R, n]; one matrix product
M M^T gives every pairwise intersection and every mask size (exact: 0/1 sums below 2^24, and
chunks are kept far below that), and the consensus histogram comes from R clamp-sums. No bool
tensors or bincounts: those are slow, unvectorized passes on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from rlvr_ray.stats.masks import RowBinPool


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
                 map_size: int | None = None):  # fmt: skip
        self.R, self.rows, self.cols = n_runs, rows, cols
        self.ge = torch.zeros(n_runs, dtype=torch.int64, device=device)  # [k-1]: count >= k
        self.inter = torch.zeros(n_runs, n_runs, dtype=torch.int64, device=device)
        self.row_sum = torch.zeros(rows, dtype=torch.int64, device=device)
        self.col_sum = torch.zeros(cols, dtype=torch.int64, device=device)
        self.pool = RowBinPool(rows, cols, map_size, n_runs) if map_size else None
        self.next_row = 0

    def add(self, masks: list[torch.Tensor]) -> None:
        """The next chunk: R 0/1 tensors (bool or integer) [r, cols], one per run, same rows."""
        r0, r = self.next_row, masks[0].shape[0]
        m = torch.stack([x.reshape(-1) for x in masks]).float()  # [R, n]
        self.inter += (m @ m.T).round_().to(torch.int64)
        count = m.sum(0)  # [n]: how many runs changed each coordinate (exact small ints)
        self.ge += torch.stack([(count - (k - 1)).clamp_(0, 1).sum() for k in range(1, self.R + 1)]).to(torch.int64)  # fmt: skip
        count = count.view(r, self.cols)
        self.row_sum[r0 : r0 + r] = count.sum(1).to(torch.int64)
        col = count.sum(0).to(torch.int64)
        self.col_sum += col
        if self.pool is not None:
            self.pool.add(r0, r, col)
        self.next_row += r

    def finish(self) -> ConsistencyStats:
        if self.next_row != self.rows:
            raise ValueError(f"saw {self.next_row} of {self.rows} rows")
        R, numel = self.R, self.rows * self.cols
        ge = [numel, *(int(x) for x in self.ge.tolist()), 0]  # count >= k for k = 0..R+1
        inter = self.inter.cpu()
        pooled = self.pool.finish() if self.pool is not None else None
        return ConsistencyStats(
            n_runs=R,
            numel=numel,
            consensus_counts=[ge[c] - ge[c + 1] for c in range(R + 1)],
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
