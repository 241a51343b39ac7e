"""The precision gate measured on fp32 master weights: which master moves bf16 rounding erased.

A run trained with fp32 master weights saves ``bf16(master)``. Given the master ``m`` of a run
beside its bf16 checkpoint ``w1`` and the base ``w0`` (bf16 patterns; the master started from
``w0`` upcast, as a pipeline that loads a bf16 checkpoint does), per coordinate:

- moved:  m != float(w0) (by value: +0 == -0);
- erased: moved, and the checkpoint is unchanged (``w1 == w0`` bitwise, +0 == -0);
- ratio:  |m - float(w0)| / (ULP(w0) / 2), where ULP(w0) is the bf16 spacing at w0 in the
  direction of the move (the gap to w0's bf16 neighbour on the master's side: below a power of
  two it is half the one above). Below 1 the move cannot show under round-to-nearest, above 1
  it must, and exactly 1 is a tie that rounds to the even one of w0 and that neighbour.

Ratios are exact: the difference of two floats of at most 24 significant bits is exact in
float64 unless their exponents are ~29 apart (then the ratio is >= 2^8, in the open last bin),
and ULP(w0) / 2 is a power of two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlvr_ray.stats.masks import update_mask

_MAG = 0x7FFF
_MAX_FINITE = 0x7F7F  # largest finite bf16 magnitude pattern


@dataclass
class GateStats:
    """Counts over the coordinates compared; ``hist[b]`` counts moved coordinates whose ratio is
    in [edges[b], edges[b + 1]) (the last bin open-ended)."""

    numel: int = 0
    n_moved: int = 0
    n_erased: int = 0
    n_below: int = 0  # moved, ratio < 1: invisible in bf16 under round-to-nearest
    n_ties: int = 0  # moved, ratio == 1: round-to-nearest-even decides
    n_round_mismatch: int = 0  # bf16(m) (nearest-even) differs from the checkpoint's w1
    n_nonfinite: int = 0  # NaN/Inf in the master
    hist: list[int] = field(default_factory=list)

    @property
    def erased_share(self) -> float | None:
        """n_erased / n_moved (None when nothing moved)."""
        return self.n_erased / self.n_moved if self.n_moved else None


def _value(mag: torch.Tensor) -> torch.Tensor:
    """bf16 magnitude patterns (int32 in [0, 0x7FFF]) -> their values, float64."""
    return mag.to(torch.int16).view(torch.bfloat16).to(torch.float64)


def half_ulp_ratio(bits0: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """int16 bf16 patterns [...] and float32 masters [...] -> float64 [...]:
    |master - w0| / (ULP(w0) / 2), ULP in the direction of the move (0 where it did not move).
    w0 must be finite."""
    u = bits0.to(torch.int32) & 0xFFFF
    mag, negative = u & _MAG, u > _MAG
    d = master.to(torch.float64) - bits0.view(torch.bfloat16).to(torch.float64)
    # away from zero (or from +-0 either way): the gap up; at the largest finite value the
    # gap of its binade (rounding to nearest overflows half a gap above it)
    top = mag >= _MAX_FINITE
    up = _value(torch.where(top, mag, mag + 1)) - _value(torch.where(top, mag - 1, mag))
    down = _value(mag) - _value((mag - 1).clamp_min(0))
    toward_zero = (mag > 0) & torch.where(negative, d > 0, d < 0)
    gap = torch.where(toward_zero, down, up)
    return 2 * d.abs() / gap


def gate_stats(
    bits0: torch.Tensor, bits1: torch.Tensor, master: torch.Tensor, edges: tuple[float, ...]
) -> GateStats:
    """bf16 patterns of the base and of the run's checkpoint (int16 [...]), the run's fp32
    master (float32 [...]) and ratio bin edges -> GateStats. Coordinates where the master is
    NaN/Inf are counted in ``n_nonfinite`` and nothing else; w0 must be finite."""
    finite = torch.isfinite(master)
    n_nonfinite = int((~finite).sum())
    if n_nonfinite:
        bits0, bits1, master = bits0[finite], bits1[finite], master[finite]
    w0 = bits0.view(torch.bfloat16).to(torch.float32)
    moved = master != w0
    erased = moved & ~update_mask(bits0, bits1)
    rne = master.to(torch.bfloat16).view(torch.int16)
    ratio = half_ulp_ratio(bits0[moved], master[moved])
    cuts = torch.tensor(edges[1:], dtype=torch.float64, device=ratio.device)
    hist = torch.bincount(torch.bucketize(ratio, cuts, right=True), minlength=len(edges))
    return GateStats(
        numel=bits0.numel() + n_nonfinite,
        n_moved=int(moved.sum()),
        n_erased=int(erased.sum()),
        n_below=int((ratio < 1).sum()),
        n_ties=int((ratio == 1).sum()),
        n_round_mismatch=int(update_mask(rne, bits1).sum()),
        n_nonfinite=n_nonfinite,
        hist=[int(c) for c in hist[: len(edges)]],
    )


def merge(a: GateStats, b: GateStats) -> GateStats:
    """The counts of two disjoint sets of coordinates (windows of one tensor) together."""
    hist = [x + y for x, y in zip(a.hist, b.hist, strict=True)] if a.hist else list(b.hist)
    return GateStats(
        a.numel + b.numel,
        a.n_moved + b.n_moved,
        a.n_erased + b.n_erased,
        a.n_below + b.n_below,
        a.n_ties + b.n_ties,
        a.n_round_mismatch + b.n_round_mismatch,
        a.n_nonfinite + b.n_nonfinite,
        hist,
    )
