"""Cross-run consistency of update masks over R runs of one base: consensus and Jaccard.

Pure torch (the fused CPU pass, ``rlvr_ray.stats.group``, counts the same histogram in its own
kernel; both finish through ``counts_from_hist`` and ``stats_from_counts``, which live in the
torch-free ``rlvr_ray.stats.records`` with ``ConsistencyStats``). The R masks of a chunk arrive
as bit planes: bit r % 16 of ``planes[r // 16][i, j]`` is M_r[i, j] (the mask passes set them,
so no run's mask is ever materialized on its own). Up to 16 runs, one histogram of the 2^R patterns
answers everything exactly: the consensus histogram is its sum by popcount, every mask size and
pairwise intersection a sum over the patterns holding those bits. Beyond 16 runs the planes are
unpacked into a float32 0/1 matrix M [R, n] and one product M M^T gives every intersection.

Every count is an exact integer for any R and any tensor size: float32 holds every integer up
to 2^24, so each chunk is consumed in pieces of at most ``piece_numel`` (<= 2^24) coordinates,
each piece's float32 histogram or product is rounded to int64 and the pieces are summed in
int64. The pieces also bound the scratch (R x piece x 4 bytes for the product), whatever rows
a caller hands in at once. Consensus profiles and maps are the members' own row/column counts
summed, so they cost nothing here.
"""

from __future__ import annotations

import numpy as np
import torch

from rlvr_ray.stats.records import (  # noqa: F401 (re-exported)
    EXACT_NUMEL,
    HIST_RUNS,
    ConsistencyStats,
    counts_from_hist,
    stats_from_counts,
)

#: coordinates per piece of a chunk (CPU: the R x piece float32 product stays in the caches;
#: a GPU: a few launches per chunk), both within EXACT_NUMEL
CPU_PIECE_NUMEL = 1 << 18
GPU_PIECE_NUMEL = 1 << 22


class ConsistencyAccumulator:
    """Consumes the R runs' masks of a [rows, cols] tensor, as bit planes, chunk by chunk."""

    HIST_RUNS = HIST_RUNS  # up to this many runs the 2^R pattern histogram is used

    def __init__(
        self, n_runs: int, rows: int, cols: int, device=None, piece_numel: int | None = None
    ):
        self.R, self.rows, self.cols = n_runs, rows, cols
        self.device = torch.device(device or "cpu")
        if piece_numel is None:
            piece_numel = CPU_PIECE_NUMEL if self.device.type == "cpu" else GPU_PIECE_NUMEL
        if not 1 <= piece_numel <= EXACT_NUMEL:
            raise ValueError(f"piece_numel must be in [1, 2^24], not {piece_numel}")
        self.piece_numel = piece_numel
        self.n_planes = (n_runs + 15) // 16
        self.by_hist = n_runs <= self.HIST_RUNS
        if self.by_hist:
            self.hist = torch.zeros(1 << n_runs, dtype=torch.int64, device=self.device)
        else:
            self.ge = torch.zeros(n_runs, dtype=torch.int64, device=self.device)  # [k-1]: >= k
            self.inter = torch.zeros(n_runs, n_runs, dtype=torch.int64, device=self.device)
        self._planes = torch.empty(0, dtype=torch.int16, device=self.device)
        self.next_row = 0

    def planes(self, r: int) -> list[torch.Tensor]:
        """Zeroed int16 bit planes [r, cols] for the next r rows (scratch, reused)."""
        n = r * self.cols
        if self._planes.numel() < self.n_planes * n:
            self._planes = torch.empty(self.n_planes * n, dtype=torch.int16, device=self.device)
        flat = self._planes[: self.n_planes * n]
        flat.zero_()
        return [p.view(r, self.cols) for p in flat.split(n)]

    def add(self, planes: list[torch.Tensor]) -> None:
        """The next chunk's bit planes (each int16 [r, cols]), every run's bit set."""
        flat = [p.reshape(-1) for p in planes]
        n = flat[0].numel()
        for a in range(0, n, self.piece_numel):
            self._add_piece([p[a : a + self.piece_numel] for p in flat])
        self.next_row += planes[0].shape[0]

    def _add_piece(self, planes: list[torch.Tensor]) -> None:
        """Bit planes of at most ``piece_numel`` coordinates (int16 [n]): every float32 partial
        sum below is an integer <= n <= 2^24, hence exact; the totals are kept in int64."""
        if self.by_hist:  # histc, unlike bincount, never waits for the host to size it
            nb = 1 << self.R
            p = (planes[0].to(torch.int32) & 0xFFFF).float()  # integers, exact in float32
            self.hist += torch.histc(p, bins=nb, min=-0.5, max=nb - 0.5).round_().to(torch.int64)
            return
        m = torch.empty(self.R, planes[0].numel(), dtype=torch.float32, device=self.device)
        for k in range(self.R):  # unpacked straight into M [R, n]: one float32 copy, no stack
            torch.bitwise_and(planes[k // 16] >> (k % 16), 1, out=m[k])
        self.inter += (m @ m.T).round_().to(torch.int64)
        count = m.sum(0)  # [n]: how many runs changed each coordinate (exact small ints)
        ge = [(count - (k - 1)).clamp_(0, 1).sum() for k in range(1, self.R + 1)]
        self.ge += torch.stack(ge).to(torch.int64)  # float32 0/1 sums: exact in a piece

    def _counts(self) -> tuple[list[int], np.ndarray]:
        """-> (consensus counts [R + 1], intersections int64 [R, R] with the sizes on the diagonal)."""
        R, numel = self.R, self.rows * self.cols
        if not self.by_hist:
            ge = [numel, *(int(x) for x in self.ge.tolist()), 0]  # count >= k for k = 0..R+1
            return [ge[c] - ge[c + 1] for c in range(R + 1)], self.inter.cpu().numpy()
        return counts_from_hist(self.hist.cpu().numpy(), R)

    def finish(
        self,
        row_sum: torch.Tensor,
        col_sum: torch.Tensor,
        pooled_sum: torch.Tensor | None = None,
        block: torch.Tensor | None = None,
    ) -> ConsistencyStats:
        """The members' summed row counts [rows], column counts [cols] (int64) and, for a map,
        summed pooled counts with the block sizes [map_rows, map_cols] -> ConsistencyStats."""
        if self.next_row != self.rows:
            raise ValueError(f"saw {self.next_row} of {self.rows} rows")
        return stats_from_counts(
            self.R, self.rows, self.cols, *self._counts(), row_sum, col_sum, pooled_sum, block
        )


def consistency(masks: list[torch.Tensor]) -> ConsistencyStats:
    """Whole-tensor form: R BoolTensors [m, n] -> ConsistencyStats."""
    m2 = [m.reshape(m.shape[0], -1) if m.dim() > 1 else m.reshape(1, -1) for m in masks]
    acc = ConsistencyAccumulator(len(m2), *m2[0].shape, device=m2[0].device)
    planes = acc.planes(m2[0].shape[0])
    for k, m in enumerate(m2):
        planes[k // 16] |= m.to(torch.int16) << (k % 16)
    acc.add(planes)
    total = torch.stack([m.to(torch.int64) for m in m2]).sum(0)
    return acc.finish(total.sum(1), total.sum(0))
