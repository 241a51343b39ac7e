"""Bitwise bf16 update masks and what they say: density, stripes, ULP steps, update norms.

Pure torch: the path of a GPU (and of a CPU without numba, or with ``RLVR_RAY_KERNELS=torch``);
a CPU scan otherwise takes the fused pass of ``rlvr_ray.stats.group``, which gives the same
answers. Weights are compared as raw 16-bit bf16 patterns (int16 views), never with a
tolerance. +0 and -0 count as unchanged. FP8 (e4m3fn, e5m2) is compared in its own format:
:func:`fp8_bits` puts each 8-bit pattern's sign and magnitude into a 16-bit pattern, so the
same comparisons (+0 == -0) and ordered keys count changes and ULP steps of the FP8 format, and
its NaN/Inf become bf16 NaN (an error, as for bf16); the values those patterns stand for are
not the weights' (a caller that needs values dequantizes). Other storage dtypes are rounded
to bf16 first (round-to-nearest-even, as ``Tensor.to(torch.bfloat16)``) and the caller records
that it was done. Big tensors are consumed in row chunks by :class:`MaskAccumulator`, so no
pass needs more than a chunk of scratch memory; :func:`mask_stats` is the one-call form for a
whole tensor.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from rlvr_ray.stats.records import (  # noqa: F401 (re-exported)
    EXACT_NUMEL,
    MaskStats,
    bin_edges,
    gini_counts,
)

_MAG = 0x7FFF  # magnitude bits of a bf16 pattern
_EXP = 0x7F80  # exponent bits: all ones means Inf or NaN


def bf16_bits(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Float tensor [...] -> (int16 bit patterns [...] of its bf16 value, rounded?)."""
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16), False
    return w.to(torch.bfloat16).view(torch.int16), True


#: FP8 formats compared in their own 8-bit patterns -> the smallest magnitude that is NaN/Inf
FP8_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}
_NAN = 0x7FC0  # a bf16 NaN pattern: what an FP8 NaN/Inf becomes


def fp8_bits(w: torch.Tensor) -> torch.Tensor:
    """FP8 tensor [...] (float8_e4m3fn or float8_e5m2) -> int16 patterns [...]: the FP8 sign as
    bit 15, its 7 magnitude bits as bits 0-6 (NaN/Inf: a bf16 NaN pattern). ``update_mask``
    and ``ulp_steps`` on them count FP8 changes and FP8 ULP steps exactly."""
    b = w.view(torch.uint8).to(torch.int32)
    mag = b & 0x7F
    mag = torch.where(mag >= FP8_NONFINITE[w.dtype], _NAN, mag)
    return (mag - ((b & 0x80) << 8)).to(torch.int16)  # sign bit 15 as int16: -32768 + mag


def compare_bits(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A stored tensor [...] -> (the int16 patterns it is compared by, rounded to bf16?): FP8
    in its own format (``fp8_bits``), everything else as ``bf16_bits``."""
    if w.dtype in FP8_NONFINITE:
        return fp8_bits(w), False
    return bf16_bits(w)


def nonfinite_count(bits: torch.Tensor, chunk: int = 1 << 20) -> int:
    """Number of Inf/NaN entries in int16 bf16 patterns [...] (scratch: one chunk, not a copy)."""
    flat = bits.reshape(-1)
    n = 0
    for i in range(0, flat.numel(), chunk):
        # exponent bits all ones <=> (bits & 0x7FFF) >= 0x7F80; a max is one fast pass
        mag = flat[i : i + chunk] & _MAG
        if int(mag.max()) >= _EXP:
            n += int((mag >= _EXP).sum())
    return n


def update_mask(bits0: torch.Tensor, bits1: torch.Tensor) -> torch.Tensor:
    """int16 patterns [...] x2 -> BoolTensor [...]: 1 where the bf16 value changed (+0 == -0)."""
    return (bits0 != bits1) & (((bits0 | bits1) & _MAG) != 0)


def ordered_key(bits: torch.Tensor) -> torch.Tensor:
    """int16 patterns [...] -> int32 [...] that counts representable bf16 values (-0 -> 0)."""
    k = bits.to(torch.int32)
    sign = k >> 15  # 0 or -1: (m ^ sign) - sign is m or -m, with no select (slow on a CPU)
    return ((k & _MAG) ^ sign) - sign


def ulp_steps(bits0: torch.Tensor, bits1: torch.Tensor) -> torch.Tensor:
    """int16 patterns [...] x2 -> int32 [...]: how many bf16 values lie between old and new."""
    return (ordered_key(bits1) - ordered_key(bits0)).abs()


def base_stats(bits: torch.Tensor):
    """int16 patterns [r, c] -> (sum of squares of the values (float64), NaN/Inf count), as
    device scalars (no host sync)."""
    return bits.view(torch.bfloat16).double().square().sum(), ((bits & _MAG) >= _EXP).sum()


def block_sizes(row_edges: list[int], col_edges: list[int]) -> torch.Tensor:
    """Element counts [len(row_edges) - 1, len(col_edges) - 1] (float64) of a block grid."""
    r = torch.tensor(row_edges, dtype=torch.float64).diff()
    c = torch.tensor(col_edges, dtype=torch.float64).diff()
    return r[:, None] * c[None, :]


def pool_vector(counts: torch.Tensor, edges: list[int] | torch.Tensor) -> torch.Tensor:
    """Sum [..., n] over contiguous bins of the last dimension -> [..., len(edges) - 1] (float64;
    exact for integer counts below 2^53). Edges already on the device spare a host copy."""
    c = counts.to(torch.float64).cumsum(-1)
    c = torch.cat([c.new_zeros(*c.shape[:-1], 1), c], -1)
    e = torch.as_tensor(edges, device=counts.device)
    return c[..., e[1:]] - c[..., e[:-1]]


def chunk_stats(b0: torch.Tensor, b1: torch.Tensor, edges: torch.Tensor):
    """Int16 patterns [r, c] x2 and int32 ULP bin edges [k] on their device -> (0/1 float32
    mask [r, c], counts of ULP steps >= each edge int64 [k], max ULP steps, sum of squared
    updates (float64), max |update|, NaN/Inf count of b1): tensors on the inputs' device, and
    no host sync (a GPU runs ahead).

    The torch path (GPU, or CPU without numba): int32 ordered keys handle sign flips and
    +0/-0; the float64 difference of two bf16 values (8 significant bits) is exact unless their
    exponents are more than 45 apart; float32 sums of 0/1 are exact up to 2^24 elements, and
    chunks are kept below that (a chunk of one row longer than that is counted in integers)."""
    steps = ulp_steps(b0, b1)
    m = steps.clamp(max=1).float()
    if steps.is_cuda:  # one launch for every edge
        ge = (steps.reshape(-1, 1) >= edges).sum(0)
    elif steps.numel() > EXACT_NUMEL:  # int64 counts: beyond float32's exact integers
        ge = torch.stack([(steps >= e).sum() for e in edges.tolist()])
    else:  # on a CPU: a pass per edge, float32 clamp-sums (bool reductions are slow there)
        sf = steps.float()
        ge = torch.stack([(sf - (e - 1)).clamp_(0, 1).sum() for e in edges.tolist()]).to(
            torch.int64
        )
    d = (b1.view(torch.bfloat16).double() - b0.view(torch.bfloat16).double()).flatten()
    nf = ((b1 & _MAG) >= _EXP).sum()
    if d.numel() == 0:
        zero = d.new_zeros(())
        return m, ge, steps.new_zeros(()), zero, zero, nf
    return m, ge, steps.max(), torch.dot(d, d), d.abs().max(), nf


class RowBinPool:
    """Sums the 0/1 values of consecutive row chunks of a [rows, cols] tensor into a grid of
    at most map_size x map_size blocks (float64 sums on the chunks' device), by ``add_rows``.
    The fused CPU pass keeps its own grid, by ``row_bins`` and ``col_edges``."""

    def __init__(self, rows: int, cols: int, map_size: int, device=None):
        self.row_edges = bin_edges(rows, min(map_size, rows))
        self.col_edges = bin_edges(cols, min(map_size, cols))
        self.grid = torch.zeros(
            len(self.row_edges) - 1, len(self.col_edges) - 1, dtype=torch.float64, device=device
        )
        self._col_edges = torch.tensor(self.col_edges, device=device)  # copied to it once
        self._bin_of_row: torch.Tensor | None = None

    def _row_bin(self, row: int) -> int:
        return bisect.bisect_right(self.row_edges, row) - 1

    def row_bins(self) -> np.ndarray:
        """int64 [rows]: the row bin of each row (what the fused CPU pass pools by)."""
        return np.repeat(np.arange(len(self.row_edges) - 1), np.diff(self.row_edges))

    def add_rows(self, r0: int, m: torch.Tensor) -> torch.Tensor:
        """0/1 float32 rows [r, cols] from r0 (any row bins) -> their column counts (int64)."""
        r = m.shape[0]
        b0, b1 = self._row_bin(r0), self._row_bin(r0 + r - 1)
        if b0 == b1:
            col = m.sum(0)
            self.grid[b0] += pool_vector(col, self._col_edges)
            return col.to(torch.int64)
        if self._bin_of_row is None:
            sizes = torch.tensor(self.row_edges, device=m.device).diff()
            self._bin_of_row = torch.repeat_interleave(
                torch.arange(len(sizes), device=m.device), sizes
            )
        seg = m.new_zeros(b1 - b0 + 1, m.shape[1]).index_add_(
            0, self._bin_of_row[r0 : r0 + r] - b0, m
        )
        self.grid[b0 : b1 + 1] += pool_vector(seg, self._col_edges)
        return seg.sum(0).to(torch.int64)

    def sums(self) -> torch.Tensor:
        """-> float64 [row bins, col bins] (CPU): the counts summed per block."""
        return self.grid.cpu()

    def blocks(self) -> torch.Tensor:
        """-> float64 [row bins, col bins]: the element count of each block."""
        return block_sizes(self.row_edges, self.col_edges)

    def finish(self) -> torch.Tensor:
        """-> float64 [row bins, col bins]: mean of the counted 0/1 values per block."""
        return self.sums() / self.blocks()


class MaskAccumulator:
    """Consumes a [rows, cols] tensor pair in consecutive row chunks; ``finish`` -> MaskStats.

    With ``map_size`` set, the pooled density map is built on the way (no full-size copy);
    chunks may span several of its row bins.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        ulp_edges: tuple[int, ...],
        device=None,
        map_size: int | None = None,
    ):
        self.rows, self.cols = rows, cols
        if tuple(ulp_edges[:2]) != (1, 2):
            raise ValueError("ULP bins must start (1, 2): the first bin is the 1-ULP count")
        self.ulp_edges = tuple(ulp_edges)
        dev = torch.device(device or "cpu")
        self.row_counts = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.col_counts = torch.zeros(cols, dtype=torch.int64, device=dev)
        self.next_row = 0
        self.pool = RowBinPool(rows, cols, map_size, dev) if map_size else None
        # device scalars, read once in finish(): the chunks never wait for the host
        self._edges_t = torch.tensor(self.ulp_edges, dtype=torch.int32, device=dev)
        self._ge = torch.zeros(len(self.ulp_edges), dtype=torch.int64, device=dev)
        self._smax = torch.zeros((), dtype=torch.int32, device=dev)
        self._ss = torch.zeros((), dtype=torch.float64, device=dev)
        self._amax = torch.zeros((), dtype=torch.float64, device=dev)
        self._nf = torch.zeros((), dtype=torch.int64, device=dev)

    def add(
        self,
        bits0: torch.Tensor,
        bits1: torch.Tensor,
        planes: list[torch.Tensor] | None = None,
        bit: int = -1,
    ) -> None:
        """The next r rows: int16 patterns [r, cols] x2. With ``planes`` (int16 bit planes
        [r, cols] from ``ConsistencyAccumulator.planes``) and ``bit`` >= 0, sets bit
        ``bit % 16`` of ``planes[bit // 16]`` where the weight changed. NaN/Inf in ``bits1``
        is counted (``nonfinite``), and the statistics are then meaningless."""
        r0, r = self.next_row, bits0.shape[0]
        plane = planes[bit // 16] if planes is not None and bit >= 0 else None
        m, ge, smax, ss, amax, nf = chunk_stats(bits0, bits1, self._edges_t)
        if self.cols <= EXACT_NUMEL:  # float32 row sums of 0/1: exact
            self.row_counts[r0 : r0 + r] = m.sum(1).to(torch.int64)
        else:
            self.row_counts[r0 : r0 + r] = torch.count_nonzero(m, dim=1)
        col = self.pool.add_rows(r0, m) if self.pool is not None else m.sum(0).to(torch.int64)
        if plane is not None:
            plane |= m.to(torch.int16) << (bit % 16)
        self._ge += ge
        torch.maximum(self._smax, smax, out=self._smax)
        self._ss += ss
        torch.maximum(self._amax, amax, out=self._amax)
        self._nf += nf
        self.col_counts += col
        self.next_row += r

    def nonfinite(self) -> int:
        """NaN/Inf values seen in the run's chunks so far."""
        return int(self._nf)

    def finish(self) -> MaskStats:
        if self.next_row != self.rows:
            raise ValueError(f"saw {self.next_row} of {self.rows} rows")
        pooled = self.pool.finish() if self.pool is not None else None
        ge = [int(x) for x in self._ge[: len(self.ulp_edges)].tolist()] + [0]
        hist = [ge[b] - ge[b + 1] for b in range(len(self.ulp_edges))]
        return MaskStats(
            numel=self.rows * self.cols,
            n_changed=sum(hist),
            row_counts=self.row_counts.cpu().numpy(),
            col_counts=self.col_counts.cpu().numpy(),
            row_ratio=self.row_counts.cpu().to(torch.float64) / self.cols,
            col_ratio=self.col_counts.cpu().to(torch.float64) / self.rows,
            ulp_hist=hist,
            ulp1=hist[0],
            ulp_max=int(self._smax),
            update_sumsq=float(self._ss),
            max_abs_update=float(self._amax),
            pooled=pooled,
        )


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Any tensor -> 2-D view [d0, prod(rest)]; a vector [n] becomes [1, n]."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def mask_stats(
    w0: torch.Tensor,
    w1: torch.Tensor,
    ulp_edges: tuple[int, ...] = (1, 2),
    map_size: int | None = None,
) -> MaskStats:
    """Whole-tensor form: bf16-valued w0, w1 [m, n] -> MaskStats (in chunks of at most 4M
    elements)."""
    b0 = as_matrix(bf16_bits(w0)[0])
    b1 = as_matrix(bf16_bits(w1)[0])
    rows, cols = b0.shape
    acc = MaskAccumulator(rows, cols, ulp_edges, device=b0.device, map_size=map_size)
    step = max(1, (1 << 22) // max(cols, 1))  # float32 0/1 sums stay exact (< 2^24)
    edges = [*range(0, rows, step), rows]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        acc.add(b0[a:b], b1[a:b])
    return acc.finish()
