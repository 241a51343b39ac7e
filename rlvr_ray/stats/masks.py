"""Bitwise bf16 update masks and what they say: density, stripes, ULP steps, update norms.

Pure torch. Weights are compared as raw 16-bit bf16 patterns (int16 views), never with a
tolerance. +0 and -0 count as unchanged. Other storage dtypes are rounded to bf16 first
(round-to-nearest-even, as ``Tensor.to(torch.bfloat16)``) and the caller records that it was
done. Big tensors are consumed in row chunks by :class:`MaskAccumulator`, so no pass needs more
than a chunk of scratch memory; :func:`mask_stats` is the one-call form for a whole tensor.
On CPU a chunk takes one fused pass (``kernels.pair_chunk``, numba); elsewhere, or with
``RLVR_RAY_KERNELS=torch``, the torch ops below, which give the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlvr_ray.stats import kernels

_MAG = 0x7FFF  # magnitude bits of a bf16 pattern
_EXP = 0x7F80  # exponent bits: all ones means Inf or NaN


def bf16_bits(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Float tensor [...] -> (int16 bit patterns [...] of its bf16 value, rounded?)."""
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16), False
    return w.to(torch.bfloat16).view(torch.int16), True


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
    return torch.where(k < 0, -(k & _MAG), k)


def ulp_steps(bits0: torch.Tensor, bits1: torch.Tensor) -> torch.Tensor:
    """int16 patterns [...] x2 -> int32 [...]: how many bf16 values lie between old and new."""
    return (ordered_key(bits1) - ordered_key(bits0)).abs()


def sumsq(bits: torch.Tensor) -> float:
    """Sum of squares (float64) of the bf16 values in int16 patterns [...]."""
    return float(bits.view(torch.bfloat16).to(torch.float64).square().sum())


def base_stats(bits: torch.Tensor) -> tuple[float, int]:
    """int16 patterns [r, c] -> (sum of squares of the values (float64), NaN/Inf count)."""
    if kernels.enabled(bits.device):
        ss, nf = kernels.base_chunk(_np(bits))
        return float(ss), int(nf)
    nf = nonfinite_count(bits)
    return (float("nan") if nf else sumsq(bits)), nf


def gini(x: torch.Tensor) -> float | None:
    """Gini coefficient of a non-negative vector [n] (0: even, -> 1: all in one entry).

    The stripe score: how concentrated updates are in few rows (columns). None if all zero.
    """
    x = x.to(torch.float64).flatten()
    n, total = x.numel(), float(x.sum())
    if n == 0 or total <= 0:
        return None
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float(2.0 * (ranks * x.sort().values).sum() / (n * total) - (n + 1) / n)


def bin_edges(size: int, bins: int) -> list[int]:
    """Edges of ``bins`` near-equal contiguous bins over ``size`` items (bins <= size)."""
    return [i * size // bins for i in range(bins + 1)]


def block_sizes(row_edges: list[int], col_edges: list[int]) -> torch.Tensor:
    """Element counts [len(row_edges) - 1, len(col_edges) - 1] (float64) of a block grid."""
    r = torch.tensor(row_edges, dtype=torch.float64).diff()
    c = torch.tensor(col_edges, dtype=torch.float64).diff()
    return r[:, None] * c[None, :]


def pool_vector(counts: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Sum a vector [n] over contiguous bins -> [len(edges) - 1] (float64)."""
    c = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.float64)
    e = torch.tensor(edges, device=counts.device)
    return c[e[1:]] - c[e[:-1]]


def _chunk_stats_exact(b0: torch.Tensor, b1: torch.Tensor, edges: tuple[int, ...]):
    """Int16 patterns [r, c] x2 -> (mask uint8 [r, c], row counts [r], col counts [c], ULP
    histogram [len(edges)], max ULP steps, sum of squared updates (float64), max |update|).

    Handles every case (sign flips, +0/-0) through int32 ordered keys."""
    steps = ulp_steps(b0, b1)
    d0 = b0.view(torch.bfloat16).to(torch.float64)
    d = (b1.view(torch.bfloat16).to(torch.float64) - d0).flatten()
    lo, hi = torch.aminmax(d)
    return _assemble(steps, d, torch.maximum(-lo, hi), edges)


def _assemble(steps: torch.Tensor, d: torch.Tensor, amax: torch.Tensor, edges: tuple[int, ...]):
    """The chunk_stats tuple from ULP steps [r, c] and float64 updates d [r * c]."""
    m = steps.clamp_max(1)
    rows, cols = _counts(m)
    smax = int(steps.max())
    return m.to(torch.uint8), rows, cols, _hist(steps, edges, smax), smax, torch.dot(d, d), amax


def _hist(steps: torch.Tensor, edges: tuple[int, ...], smax: int) -> torch.Tensor:
    """Counts of steps in [edges[b], edges[b + 1]) (last bin open) -> int64 [len(edges)].

    count(steps >= e) is the sum of clamp(steps - (e - 1), 0, 1) over float32 (one upcast,
    then vectorized float ops; a float32 sum of 0/1 is exact below 2^24 elements, and chunks
    are kept far below that). Edges above ``smax`` (the largest step) count nothing: skipped."""
    ge = torch.zeros(len(edges), dtype=torch.int64, device=steps.device)
    live = [i for i, e in enumerate(edges) if e <= smax]
    if live:
        sf = steps.float()
        ge[: len(live)] = torch.stack([(sf - (edges[i] - 1)).clamp_(0, 1).sum() for i in live]).to(torch.int64)  # fmt: skip
    return ge - torch.cat([ge[1:], ge.new_zeros(1)])


def _counts(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 tensor [r, c] -> (row sums [r], col sums [c]) as int64 (float32 sums: exact)."""
    mf = m.float()
    return mf.sum(1).to(torch.int64), mf.sum(0).to(torch.int64)


def chunk_stats(b0: torch.Tensor, b1: torch.Tensor, edges: tuple[int, ...]):
    """See ``_chunk_stats_exact``; same answers, faster when no coordinate changed sign.

    When b0 and b1 have the same sign bit everywhere, |b1 - b0| in int16 IS the number of
    representable values between them (sign-magnitude patterns are monotone within a sign),
    so the pass stays in 16-bit integers and float32, with no int32 keys, no bool tensors and
    no selects (each of those costs a slow, unvectorized pass on CPU). A chunk with any sign
    change (including +0 <-> -0) takes the exact path."""
    if b0.numel() == 0 or int((b0 ^ b1).min()) < 0:
        return _chunk_stats_exact(b0, b1, edges)
    steps = (b1 - b0).abs_()
    # bf16 -> fp32 is exact, and so is the difference of two same-sign bf16 values whose
    # exponents differ by at most 15 (fp32 has 16 more significand bits); further apart, the
    # fp32 rounding (relative 2^-24) is far below anything these statistics resolve
    d = (b1.view(torch.bfloat16).float() - b0.view(torch.bfloat16).float()).flatten()
    lo, hi = torch.aminmax(d)
    return _assemble(steps, d.double(), torch.maximum(-lo, hi).double(), edges)


class RowBinPool:
    """Sums per-chunk column counts of a [rows, cols] tensor into a grid of at most
    map_size x map_size blocks of mean densities."""

    def __init__(self, rows: int, cols: int, map_size: int):
        self.row_edges = bin_edges(rows, min(map_size, rows))
        self.col_edges = bin_edges(cols, min(map_size, cols))
        self.done: list[torch.Tensor] = []
        self.current: torch.Tensor | None = None

    def add(self, r0: int, r: int, col_counts: torch.Tensor) -> None:
        b = len(self.done)
        if r0 < self.row_edges[b] or r0 + r > self.row_edges[b + 1]:
            raise ValueError(f"chunk rows {r0}..{r0 + r} straddle map row bin {b}")
        # sum whole columns over the row bin; pool them into column bins once, at its end
        self.current = col_counts.clone() if self.current is None else self.current.add_(col_counts)  # fmt: skip
        if r0 + r == self.row_edges[b + 1]:
            self.done.append(pool_vector(self.current, self.col_edges))
            self.current = None

    def sums(self) -> torch.Tensor:
        """-> float64 [row bins, col bins] (CPU): the counts summed per block."""
        return torch.stack(self.done).cpu()

    def blocks(self) -> torch.Tensor:
        """-> float64 [row bins, col bins]: the element count of each block."""
        return block_sizes(self.row_edges, self.col_edges)

    def finish(self) -> torch.Tensor:
        """-> float64 [row bins, col bins]: mean of the counted 0/1 values per block."""
        return self.sums() / self.blocks()


@dataclass
class MaskStats:
    """Per (run, tensor) mask statistics; ratios are float64 vectors on the input's device."""

    numel: int
    n_changed: int
    row_ratio: torch.Tensor  # [rows]: rho_i = mean_j M_ij
    col_ratio: torch.Tensor  # [cols]: kappa_j = mean_i M_ij
    ulp_hist: list[int]  # counts per bin of ``edges``
    ulp1: int
    ulp_max: int
    update_sumsq: float
    max_abs_update: float
    pooled: torch.Tensor | None  # [map_rows, map_cols] pooled density, if asked for

    @property
    def update_density(self) -> float:
        return self.n_changed / self.numel if self.numel else float("nan")

    @property
    def ulp1_share(self) -> float | None:
        return self.ulp1 / self.n_changed if self.n_changed else None


class MaskAccumulator:
    """Consumes a [rows, cols] tensor pair in consecutive row chunks; ``finish`` -> MaskStats.

    With ``map_size`` set, the pooled density map is built on the way (no full-size copy);
    chunks must then not straddle the row bins ``bin_edges(rows, min(map_size, rows))``.
    """

    def __init__(self, rows: int, cols: int, ulp_edges: tuple[int, ...], device=None,
                 map_size: int | None = None):  # fmt: skip
        self.rows, self.cols = rows, cols
        if tuple(ulp_edges[:2]) != (1, 2):
            raise ValueError("ULP bins must start (1, 2): the first bin is the 1-ULP count")
        self.ulp_edges = tuple(ulp_edges)
        self.row_counts = torch.zeros(rows, dtype=torch.int64, device=device)
        self.col_counts = torch.zeros(cols, dtype=torch.int64, device=device)
        self.hist = torch.zeros(len(ulp_edges), dtype=torch.int64, device=device)
        self.ulp_max = 0
        self.update_sumsq = self.max_abs = 0.0
        self.next_row = 0
        self.pool = RowBinPool(rows, cols, map_size) if map_size else None
        self.kernel = kernels.enabled(self.row_counts.device)
        if self.kernel:  # the fused pass's histogram (>= counts) and per-chunk column counts
            self._edges = kernels.padded_edges(self.ulp_edges)
            self._ge = np.zeros(len(self._edges), dtype=np.int64)
            self._col = torch.zeros(cols, dtype=torch.int64)
            self._nop = np.zeros((1, 1), dtype=np.uint16)

    def add(self, bits0: torch.Tensor, bits1: torch.Tensor,
            planes: list[torch.Tensor] | None = None, bit: int = -1) -> int:  # fmt: skip
        """The next r rows: int16 patterns [r, cols] x2 -> the NaN/Inf count of ``bits1``.

        When it is not 0 the chunk's statistics are not meaningful (the caller drops the run).
        With ``planes`` (int16 bit planes [r, cols] from ``ConsistencyAccumulator.planes``) and
        ``bit`` >= 0, sets bit ``bit % 16`` of ``planes[bit // 16]`` where the weight changed."""
        r0, r = self.next_row, bits0.shape[0]
        plane = planes[bit // 16] if planes is not None and bit >= 0 else None
        if self.kernel:
            col, smax, ss, amax, nf = self._add_kernel(bits0, bits1, plane, bit % 16)
            if nf:
                return nf
        else:
            nf = nonfinite_count(bits1)
            if nf:
                return nf
            mask, counts, col, hist, smax, ss, amax = chunk_stats(bits0, bits1, self.ulp_edges)
            self.row_counts[r0 : r0 + r] = counts
            self.hist += hist
            if plane is not None:
                plane |= mask.to(torch.int16) << (bit % 16)
        self.col_counts += col
        if self.pool is not None:
            self.pool.add(r0, r, col)
        self.ulp_max = max(self.ulp_max, int(smax))
        self.update_sumsq += float(ss)
        self.max_abs = max(self.max_abs, float(amax))
        self.next_row += r
        return 0

    def _add_kernel(self, bits0, bits1, plane, bit):
        """The fused CPU pass: fills row counts and the histogram in place."""
        r0, r = self.next_row, bits0.shape[0]
        col = self._col[: self.cols]
        smax, ss, amax, nf = kernels.pair_chunk(
            _np(bits0), _np(bits1), self._edges, self.row_counts[r0 : r0 + r].numpy(),
            col.numpy(), self._ge, _np(plane).view(np.uint16) if plane is not None else self._nop,
            bit if plane is not None else -1,
        )  # fmt: skip
        return col, smax, ss, np.int64(amax).view(np.float64), nf

    def finish(self) -> MaskStats:
        if self.next_row != self.rows:
            raise ValueError(f"saw {self.next_row} of {self.rows} rows")
        pooled = self.pool.finish() if self.pool is not None else None
        if self.kernel:
            ge = [int(x) for x in self._ge[: len(self.ulp_edges)]] + [0]
            hist = [ge[b] - ge[b + 1] for b in range(len(self.ulp_edges))]
        else:
            hist = [int(x) for x in self.hist.tolist()]
        return MaskStats(
            numel=self.rows * self.cols,
            n_changed=sum(hist),
            row_ratio=self.row_counts.to(torch.float64) / self.cols,
            col_ratio=self.col_counts.to(torch.float64) / self.rows,
            ulp_hist=hist,
            ulp1=hist[0],
            ulp_max=self.ulp_max,
            update_sumsq=self.update_sumsq,
            max_abs_update=self.max_abs,
            pooled=pooled,
        )


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's numpy view, C-contiguous (a copy only if it was not)."""
    return np.ascontiguousarray(t.numpy())


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Any tensor -> 2-D view [d0, prod(rest)]; a vector [n] becomes [1, n]."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def mask_stats(w0: torch.Tensor, w1: torch.Tensor, ulp_edges: tuple[int, ...] = (1, 2),
               map_size: int | None = None) -> MaskStats:  # fmt: skip
    """Whole-tensor form: bf16-valued w0, w1 [m, n] -> MaskStats (chunked by map row bins)."""
    b0 = as_matrix(bf16_bits(w0)[0])
    b1 = as_matrix(bf16_bits(w1)[0])
    rows, cols = b0.shape
    acc = MaskAccumulator(rows, cols, ulp_edges, device=b0.device, map_size=map_size)
    edges = bin_edges(rows, min(map_size, rows)) if map_size else [0, rows]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        acc.add(b0[a:b], b1[a:b])
    return acc.finish()
