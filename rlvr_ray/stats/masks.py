"""Bitwise bf16 update masks and what they say: density, stripes, ULP steps, update norms.

Pure torch. Weights are compared as raw 16-bit bf16 patterns (int16 views), never with a
tolerance. +0 and -0 count as unchanged. Other storage dtypes are rounded to bf16 first
(round-to-nearest-even, as ``Tensor.to(torch.bfloat16)``) and the caller records that it was
done. Big tensors are consumed in row chunks by :class:`MaskAccumulator`, so no pass needs more
than a chunk of scratch memory; :func:`mask_stats` is the one-call form for a whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MAG = 0x7FFF  # magnitude bits of a bf16 pattern
_EXP = 0x7F80  # exponent bits: all ones means Inf or NaN


def bf16_bits(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Float tensor [...] -> (int16 bit patterns [...] of its bf16 value, rounded?)."""
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16), False
    return w.to(torch.bfloat16).view(torch.int16), True


def nonfinite_count(bits: torch.Tensor) -> int:
    """Number of Inf/NaN entries in int16 bf16 patterns [...]."""
    return int(((bits & _EXP) == _EXP).sum())


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

    With ``map_size`` set, each chunk must be exactly one row bin of ``bin_edges(rows,
    map_rows)`` and the pooled density map is built on the way (no full-size float copy).
    """

    def __init__(self, rows: int, cols: int, ulp_edges: tuple[int, ...], device=None,
                 map_size: int | None = None):  # fmt: skip
        self.rows, self.cols = rows, cols
        self.edges = torch.tensor(ulp_edges, dtype=torch.int32, device=device)
        self.row_counts = torch.zeros(rows, dtype=torch.int64, device=device)
        self.col_counts = torch.zeros(cols, dtype=torch.int64, device=device)
        self.hist = torch.zeros(len(ulp_edges), dtype=torch.int64, device=device)
        self.ulp1 = self.ulp_max = self.n_changed = 0
        self.update_sumsq = self.max_abs = 0.0
        self.next_row = 0
        self.map_col_edges = bin_edges(cols, min(map_size, cols)) if map_size else None
        self.map_rows: list[torch.Tensor] = []

    def add(self, bits0: torch.Tensor, bits1: torch.Tensor) -> torch.Tensor:
        """Chunk [r, cols] int16 patterns x2 (the next r rows) -> its mask BoolTensor[r, cols]."""
        r0, r = self.next_row, bits0.shape[0]
        mask = update_mask(bits0, bits1)
        counts = mask.sum(1)
        self.row_counts[r0 : r0 + r] = counts
        col = mask.sum(0)
        self.col_counts += col
        if self.map_col_edges is not None:
            self.map_rows.append(pool_vector(col, self.map_col_edges))
        n = int(counts.sum())
        if n:
            b0, b1 = bits0[mask], bits1[mask]
            steps = ulp_steps(b0, b1)
            self.hist += torch.bincount(torch.bucketize(steps, self.edges, right=True) - 1,
                                        minlength=len(self.edges))  # fmt: skip
            self.ulp1 += int((steps == 1).sum())
            self.ulp_max = max(self.ulp_max, int(steps.max()))
            d = b1.view(torch.bfloat16).to(torch.float64) - b0.view(torch.bfloat16).to(
                torch.float64
            )
            self.update_sumsq += float(d.square().sum())
            self.max_abs = max(self.max_abs, float(d.abs().max()))
        self.n_changed += n
        self.next_row += r
        return mask

    def finish(self) -> MaskStats:
        if self.next_row != self.rows:
            raise ValueError(f"saw {self.next_row} of {self.rows} rows")
        pooled = None
        if self.map_col_edges is not None:
            row_edges = bin_edges(self.rows, len(self.map_rows))
            block = block_sizes(row_edges, self.map_col_edges)
            pooled = torch.stack(self.map_rows).cpu() / block
        return MaskStats(
            numel=self.rows * self.cols,
            n_changed=self.n_changed,
            row_ratio=self.row_counts.to(torch.float64) / self.cols,
            col_ratio=self.col_counts.to(torch.float64) / self.rows,
            ulp_hist=[int(x) for x in self.hist.tolist()],
            ulp1=self.ulp1,
            ulp_max=self.ulp_max,
            update_sumsq=self.update_sumsq,
            max_abs_update=self.max_abs,
            pooled=pooled,
        )


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
