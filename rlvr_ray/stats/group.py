"""A base and all its runs' copies of one tensor, in one fused pass on the CPU.

``kernels.group_rows`` decodes each base row once and walks every run's copy of it while it is
in L1: every run's mask statistics (``MaskStats``) and the members' consensus pattern come out
of the one pass, so neither a run's mask nor its bit plane is ever written to memory. The
copies' rows arrive as int16 bf16 patterns in one flat buffer (the worker reads each copy's
rows into its slot), located by offsets. Up to 4 members the kernel tallies, in int32 lanes,
the coordinates changed in exactly c members and each pair's intersection; up to 16 it counts
a histogram of the 2^R member patterns (two coordinates per increment for R <= 6, which halves
the increments); beyond 16 members it sets bit planes, a piece of rows per kernel call, and
``ConsistencyAccumulator`` multiplies them out (M M^T, exact in pieces), as on a GPU.

Everything here is numpy (the statistics come back as numpy arrays): torch is imported only for
a consensus of more than 16 members, whose product is torch's.
"""

from __future__ import annotations

import numpy as np

from rlvr_ray.stats import kernels
from rlvr_ray.stats.records import (
    HIST_RUNS,
    ConsistencyStats,
    MaskStats,
    bin_edges,
    counts_from_hist,
    stats_from_counts,
)

#: up to this many members, the kernel tallies exact counts and pair intersections in int32
#: lanes (no histogram); up to PAIR_MEMBERS, two coordinates' patterns share one increment
TALLY_MEMBERS = 4
PAIR_MEMBERS = 6
#: the pairs whose intersections the tallies hold, in order (the kernel's masks 3, 5, 9, ...)
TALLY_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
#: rows per kernel call: the kernel counts a column between two flushes in int32
MAX_ROWS = (1 << 31) - 1
#: the most columns a tensor may have here: the kernel sums min(ULP steps, 4) over a row in
#: int32 (the worker takes the torch path for wider rows; no weight matrix has them)
MAX_COLS = (1 << 29) - 1


class GroupAccumulator:
    """Consumes a [rows, cols] tensor's base and R runs in consecutive row ranges.

    ``members``: the runs (indices into the R) whose masks enter the consensus (none, or at
    least two); ``map_size``: the pooled density map's size (None: no map); ``piece_numel``:
    beyond 16 members, the coordinates per M M^T piece (``ConsistencyAccumulator``'s)."""

    def __init__(
        self,
        rows: int,
        cols: int,
        n_runs: int,
        members: list[int],
        ulp_edges: tuple[int, ...],
        map_size: int | None = None,
        piece_numel: int | None = None,
    ):
        if cols > MAX_COLS:
            raise ValueError(f"rows of {cols} columns: the fused pass takes at most {MAX_COLS}")
        R, M = n_runs, len(members)
        self.rows, self.cols, self.R, self.members = rows, cols, R, list(members)
        self.ulp_edges = tuple(ulp_edges)
        self.edges = kernels.padded_edges(self.ulp_edges)
        self.row_counts = np.zeros((R, rows), dtype=np.int64)
        self.col_counts = np.zeros((R, cols), dtype=np.int64)
        self.steps_at_least = np.zeros((R, len(self.edges)), dtype=np.int64)
        self.int_stats = np.zeros((R + 1, 3), dtype=np.int64)
        self.sumsq = np.zeros(R + 1, dtype=np.float64)
        self.member_bit = np.full(R, -1, dtype=np.int64)
        self.member_bit[self.members] = np.arange(M)
        # the torch accumulator takes > 16 members' bit planes (M M^T); fewer are histogrammed
        self.cons = None
        if M > HIST_RUNS:
            from rlvr_ray.stats.consistency import ConsistencyAccumulator

            self.cons = ConsistencyAccumulator(M, rows, cols, "cpu", piece_numel)
        self.by_hist = M >= 2 and self.cons is None
        if self.by_hist and M <= TALLY_MEMBERS:
            self.hist = np.zeros((2, 6), dtype=np.int64)
        elif self.by_hist and M <= PAIR_MEMBERS:
            self.hist = np.zeros((5, 1 << (2 * M)), dtype=np.int64)
        elif self.by_hist:
            self.hist = np.zeros((4, 1 << M), dtype=np.int64)
        else:
            self.hist = np.zeros((4, 1), dtype=np.int64)
        self._no_planes = np.zeros((0, 1, 1), dtype=np.uint16)
        self.has_consensus = M >= 2
        self.blocks: np.ndarray | None = None  # each map block's element count
        if map_size:  # the map's grid, as RowBinPool cuts it (the torch path's)
            row_edges = np.array(bin_edges(rows, min(map_size, rows)), dtype=np.int64)
            self.col_edges = np.array(bin_edges(cols, min(map_size, cols)), dtype=np.int64)
            sizes = np.diff(row_edges), np.diff(self.col_edges)
            self.grid = np.zeros((R, len(sizes[0]), len(sizes[1])), dtype=np.float64)
            self.row_bin = np.repeat(np.arange(len(sizes[0])), sizes[0])
            self.blocks = np.outer(*sizes).astype(np.float64)
        else:
            self.grid = np.zeros((R, 0, 0), dtype=np.float64)
            self.row_bin = np.zeros(rows, dtype=np.int64)
            self.col_edges = np.zeros(1, dtype=np.int64)
        self.cur = np.zeros(1, dtype=np.int64)
        self.next_row = 0

    def add(self, flat: np.ndarray, off: np.ndarray, n: int) -> None:
        """The next n rows: copy k's (0: the base, r + 1: run r) start at ``flat[off[k]]``
        (int16 patterns, rows of ``cols`` elements, contiguous)."""
        step = MAX_ROWS  # the kernel counts columns in int32 within a call
        if self.cons is not None:  # bit planes of a piece's rows at a time: bounded scratch
            step = max(1, self.cons.piece_numel // max(self.cols, 1))
        for a in range(0, n, step):
            m = min(step, n - a)
            planes = self._no_planes
            if self.cons is not None:
                planes = np.stack([p.numpy() for p in self.cons.planes(m)]).view(np.uint16)
            kernels.group_rows(
                flat,
                off + a * self.cols,
                m,
                self.cols,
                self.next_row,
                self.edges,
                self.member_bit,
                len(self.members),
                self.row_counts,
                self.col_counts,
                self.steps_at_least,
                self.int_stats,
                self.sumsq,
                self.hist,
                planes,
                self.row_bin,
                self.col_edges,
                self.grid,
                self.cur,
            )
            if self.cons is not None:
                import torch

                self.cons.add([torch.from_numpy(p.view(np.int16)) for p in planes])
            self.next_row += m

    @property
    def any_nonfinite(self) -> bool:
        """Whether any copy held NaN/Inf values so far."""
        return bool(self.int_stats[:, 2].any())

    def nonfinite(self, k: int) -> int:
        """NaN/Inf values seen so far in copy k (0: the base, r + 1: run r)."""
        return int(self.int_stats[k, 2])

    @property
    def base_sumsq(self) -> float:
        return float(self.sumsq[0])

    def _check(self) -> None:
        if self.next_row != self.rows:
            raise ValueError(f"saw {self.next_row} of {self.rows} rows")

    def finish(self) -> None:
        """The last rows are in."""
        self._check()

    def mask_stats(self, r: int) -> MaskStats:
        """Run r's statistics (after ``finish``)."""
        at_least = [int(x) for x in self.steps_at_least[r, : len(self.ulp_edges)]] + [0]
        hist = [at_least[b] - at_least[b + 1] for b in range(len(self.ulp_edges))]
        blocks = self.blocks
        return MaskStats(
            numel=self.rows * self.cols,
            n_changed=sum(hist),
            row_counts=self.row_counts[r],
            col_counts=self.col_counts[r],
            row_ratio=self.row_counts[r] / self.cols,
            col_ratio=self.col_counts[r] / self.rows,
            ulp_hist=hist,
            ulp1=hist[0],
            ulp_max=int(self.int_stats[r + 1, 0]),
            update_sumsq=float(self.sumsq[r + 1]),
            max_abs_update=float(self.int_stats[r + 1, 1:2].view(np.float64)[0]),
            pooled=self.grid[r] / blocks if blocks is not None else None,
        )

    def consistency(self) -> ConsistencyStats | None:
        """The members' consensus and Jaccard statistics (after ``finish``); None: < 2 members."""
        if not self.has_consensus:
            return None
        self._check()
        m = self.members
        row_sum = self.row_counts[m].sum(0)
        col_sum = self.col_counts[m].sum(0)
        pooled = self.grid[m].sum(0) if self.blocks is not None else None
        block = self.blocks
        if self.cons is not None:  # > 16 members: the bit planes went through M M^T
            return self.cons.finish(row_sum, col_sum, pooled, block)
        if self.hist.shape[0] == 2:  # tallies: exact counts 1..4, pairs' intersections
            M = len(m)
            exact = [int(x) for x in self.hist[0, :M]]
            counts = [self.rows * self.cols - sum(exact), *exact]
            inter = np.diag(self.row_counts[m].sum(1))
            for (a, b), x in zip(TALLY_PAIRS, self.hist[1], strict=True):
                if b < M:
                    inter[a, b] = inter[b, a] = x
            return stats_from_counts(
                M, self.rows, self.cols, counts, inter, row_sum, col_sum, pooled, block
            )
        nv = 1 << len(m)
        h = self.hist[:4].sum(0)
        if self.hist.shape[0] == 5:  # pairs (lo | hi << M): each member pattern twice
            pairs = h.reshape(nv, nv)
            h = pairs.sum(0) + pairs.sum(1) + self.hist[4, :nv]
        counts, inter = counts_from_hist(h, len(m))
        return stats_from_counts(
            len(m), self.rows, self.cols, counts, inter, row_sum, col_sum, pooled, block
        )
