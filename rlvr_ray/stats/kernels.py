"""The fused CPU pass (numba): a tensor's base and every run's copy, in one pass over its rows.

The torch path in ``masks`` / ``consistency`` (a GPU's) makes 20-40 passes over a chunk per run
(one per eager op); ``group_rows`` decodes each base row once and walks every run's copy of it
while the row's buffers are in L1, with every inner loop written so that LLVM vectorizes it in
int32 lanes (each operation cast back to int32: numba widens them to int64 otherwise) and
without branches; float maxima are taken on integer bit patterns. It computes the same numbers
as the torch path, bit for bit for every count and maximum, and to the last few ulps for the
float64 sums of squares (summation order). Used on CPU when numba imports and
``RLVR_RAY_KERNELS`` is not ``torch`` (``rlvr_ray.stats.group`` drives it).

Measured on one core of a 1 MiB-L2 AMD EPYC (Zen 5), 896-column rows, base + 4 runs with the
consensus (4 members: tallies), 256K-element windows: 1.1 ns per coordinate for all four runs
(0.28 ns per run), against 7.5 ns per run for the torch ops (``benchmarks/scan_throughput.py``
has the end-to-end figures).
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is a dependency, but the torch path must keep working without it
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None

#: pads the ULP edges to the four columns of ``ge`` the main loop fills (it counts steps >= 1,
#: 2, 3, 4 itself and never reads these); edges past the fourth are counted in a second loop,
#: only in rows whose largest step reaches them (no step reaches 2^30: steps < 2^17)
_BIG = np.int32(1 << 30)
_FM = {"reassoc", "nsz", "contract"}  # reassociation lets LLVM vectorize the float64 sums


def enabled(device) -> bool:
    """Whether the numba kernels serve ``device`` (a torch.device or None for the CPU)."""
    if njit is None or os.environ.get("RLVR_RAY_KERNELS", "numba") == "torch":
        return False
    return device is None or getattr(device, "type", str(device)) == "cpu"


def warm(device=None) -> None:
    """Compile the kernels, or load them from numba's cache (~0.4 s a process), if they serve
    ``device``: a worker does it at start rather than inside its first unit."""
    if enabled(device):
        i64 = np.zeros((1, 1), np.int64)
        group_rows(
            np.zeros(2, np.int16),
            np.zeros(2, np.int64),
            1,
            1,
            0,
            padded_edges((1, 2)),
            np.zeros(1, np.int64),
            0,
            i64,
            i64,
            np.zeros((1, 4), np.int64),
            np.zeros((2, 3), np.int64),
            np.zeros(2, np.float64),
            np.zeros((4, 1), np.int64),
            np.zeros((0, 1, 1), np.uint16),
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            np.zeros((1, 0, 0), np.float64),
            np.zeros(1, np.int64),
        )


if njit is not None:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _popcount(typingctx, x):
        """The set bits of an int32 (LLVM's ctpop: one vpopcntd per 16 lanes on AVX-512)."""

        def codegen(context, builder, signature, args):
            fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(32)])
            return builder.call(fn, args)

        return types.int32(types.int32), codegen


def _jit(fn):
    return njit(cache=True, nogil=True, boundscheck=False, fastmath=_FM)(fn) if njit else fn


def padded_edges(edges: tuple[int, ...]) -> np.ndarray:
    """ULP bin edges as the int32 array ``group_rows`` takes (at least 4, padded with 2^30).
    The main loop counts steps >= 1, 2, 3 and 4 (as sums of min(steps, k)): the edges must
    start 1, 2, 3, 4 (or 1, 2 or 1, 2, 3); the ones after are counted where a row reaches them."""
    if len(edges) < 2 or tuple(edges[:4]) != (1, 2, 3, 4)[: len(edges)]:
        raise ValueError(
            f"ULP bins must start 1, 2 (the first bin is the 1-ULP count) and go on "
            f"3, 4 in the fused pass, not {tuple(edges)}"
        )
    return np.array([*edges, *[_BIG] * max(0, 4 - len(edges))], dtype=np.int32)


@_jit
def group_rows(
    flat,
    off,
    n,
    c,
    row0,
    edges,
    pbit,
    members,
    rows_out,
    col_out,
    ge,
    iacc,
    facc,
    hist,
    planes,
    row_bin,
    col_edges,
    grid,
    cur,
):  # pragma: no cover
    """The base and R runs of n rows (n < 2^31) in one pass: every run's mask statistics and
    the runs' consensus pattern, with the base's row decoded once and every row buffer in L1.

    flat: int16 [*], every copy's rows; off: int64 [R + 1], where the n x c rows of copy k
    (0: the base, r + 1: run r) start in flat; row0: the tensor row of the first of them;
    edges: int32 [k >= 4] ULP bin edges (``padded_edges``); pbit: int64 [R], run r's bit in
    the consensus pattern (-1: not a member); members: how many runs are. Accumulated across
    calls: rows_out: int64 [R, rows] <- changed per row; col_out: int64 [R, c] += changed per
    column; ge: int64 [R, k] += changes that moved >= edges[b] ULPs; iacc: int64 [R + 1, 3] =
    (max ULP steps, max |update| as float64 bits, NaN/Inf count) (row 0: the base's NaN/Inf);
    facc: float64 [R + 1] += sum of squared updates (0: sum of squares of the base);
    hist: int64 [2, 6] (members <= 4: tallies, row 0 += coordinates changed in exactly
    1..4 members, row 1 += both members changed, for the pairs (0,1) (0,2) (0,3) (1,2) (1,3)
    (2,3)), [5, 4^members] (pairs of patterns, members <= 6) or [4, 2^members] += counts
    of the consensus patterns ([4, 1]: none); planes: uint16 [P, n, c], bit b % 16 of
    planes[b // 16] set where member b changed (P = 0: none); grid: float64 [R, map rows, map
    cols] += changes per block (no rows: no map; row_bin: int64 [rows], each row's map row;
    col_edges: int64 [map cols + 1], where each map column starts; cur: int64 [1], the map
    row being filled).

    Column counts gather in int32 between flushes (each map row, and the call's end).
    """
    R = off.shape[0] - 1
    if c == 0 or n == 0:
        return
    i32 = np.int32
    k = edges.shape[0]
    k0 = np.empty(c, np.int32)
    t0 = np.empty(c, np.int32)
    g0 = t0.view(np.float32)
    t1 = np.empty(c, np.int32)
    f1 = t1.view(np.float32)
    u32 = np.empty(c, np.int32)  # |update| as float32 bits
    d32 = u32.view(np.float32)
    dv = np.empty(c, np.float64)
    di = dv.view(np.int64)
    one = np.empty(1, np.float64)  # a float64's bits, through memory
    one_bits = one.view(np.int64)
    pat = np.zeros(c, np.int32)
    co = np.zeros((R, c), np.int32)  # changes per column since the last flush
    use_hist = hist.shape[1] > 1
    pair = hist.shape[0] == 5  # hist: [5, 4^members], pairs of patterns (row 4: single ones)
    tally = hist.shape[0] == 2  # hist: [2, 6], exact counts and pair intersections
    shift = i32(members)
    c8 = c - c % 8
    c4 = c - c % 4
    use_planes = planes.shape[0] > 0
    use_grid = grid.shape[1] > 0
    nf0 = np.int64(0)
    bss = 0.0
    for i in range(n):
        g = row0 + i
        if use_grid and row_bin[g] != cur[0]:  # a map row is complete: pool its columns
            _flush(co, col_out, col_edges, grid, cur[0])
            cur[0] = row_bin[g]
        o = off[0] + i * c
        xb = flat[o : o + c]
        amag = i32(0)
        for j in range(c):
            x0 = i32(xb[j])
            a0 = i32(x0 & i32(0x7FFF))
            amag = i32(max(amag, a0))
            # ordered keys count representable values; +0 and -0 both map to 0
            k0[j] = x0 if x0 >= i32(0) else i32(-a0)
            t0[j] = i32(x0 << i32(16))  # the float32 whose upper half is the bf16 value
        if amag >= i32(0x7F80):
            nf0 += _count_nonfinite(xb)
        for j in range(c):
            v = np.float64(g0[j])
            bss += v * v
        if use_hist:
            for j in range(c):
                pat[j] = i32(0)
        for r in range(R):
            o = off[r + 1] + i * c
            xr = flat[o : o + c]
            cr = co[r]
            b = pbit[r]
            # this run's bit of the consensus pattern (0: not a member)
            bitv = i32(i32(1) << i32(b)) if b >= 0 and use_hist else i32(0)
            rc = i32(0)
            g1 = i32(0)
            g2 = i32(0)
            g3 = i32(0)
            rmax = i32(0)
            amag = i32(0)
            # every operation cast back to int32: numba widens int32 arithmetic to int64,
            # and LLVM then vectorizes in half as many lanes (or not at all)
            for j in range(c):
                x1 = i32(xr[j])
                a1 = i32(x1 & i32(0x7FFF))
                amag = i32(max(amag, a1))
                k1 = x1 if x1 >= i32(0) else i32(-a1)
                d = i32(k1 - k0[j])
                s = i32(max(d, i32(-d)))
                m = i32(s != i32(0))
                rc = i32(rc + m)
                cr[j] = i32(cr[j] + m)
                # a masked OR: a shift by a variable count is done in int64 lanes otherwise
                pat[j] = i32(pat[j] | i32(i32(-m) & bitv))
                # sums of min(steps, k): steps >= k counted as their differences, in half
                # the instructions of a compare and a count (c < 2^29: no overflow)
                g1 = i32(g1 + i32(min(s, i32(2))))
                g2 = i32(g2 + i32(min(s, i32(3))))
                g3 = i32(g3 + i32(min(s, i32(4))))
                rmax = i32(max(rmax, s))
                t1[j] = i32(x1 << i32(16))
            if amag >= i32(0x7F80):  # NaN/Inf in this row of the run: count them
                iacc[r + 1, 2] += _count_nonfinite(xr)
            if b >= 0 and use_planes:  # > 16 members: bit planes
                pm = np.uint16(1 << (b % 16))
                pl = b // 16
                for j in range(c):
                    x1 = i32(xr[j])
                    k1 = x1 if x1 >= i32(0) else i32(-i32(x1 & i32(0x7FFF)))
                    planes[pl, i, j] |= np.uint16(k1 != k0[j]) * pm
            rows_out[r, g] = rc
            ge[r, 0] += rc
            ge[r, 1] += g1 - rc  # steps >= 2
            ge[r, 2] += g2 - g1  # >= 3
            ge[r, 3] += g3 - g2  # >= 4
            if k > 4 and rmax >= edges[4]:  # rare for RL: steps of 5+ ULPs in this row
                for q in range(4, k):
                    e = i32(edges[q])
                    gq = i32(0)
                    for j in range(c):
                        x1 = i32(xr[j])
                        k1 = x1 if x1 >= i32(0) else i32(-i32(x1 & i32(0x7FFF)))
                        d = i32(k1 - k0[j])
                        gq = i32(gq + i32(i32(max(d, i32(-d))) >= e))
                    ge[r, q] += gq
            iacc[r + 1, 0] = max(iacc[r + 1, 0], rmax)
            ss = 0.0
            if rmax < 1024:
                # keys < 1024 apart: exponents within 8 of each other (or both values tiny),
                # so the float32 difference of the two bf16 values is exact, as is its square
                # in float64 (the general path's numbers, at less work)
                for j in range(c):
                    df = f1[j] - g0[j]
                    d32[j] = df
                    dd = np.float64(df)
                    ss += dd * dd
                am = i32(0)
                for j in range(c):  # |d| is ordered like its bit pattern with the sign cleared
                    am = i32(max(am, i32(u32[j] & i32(0x7FFFFFFF))))
                u32[0] = am
                one[0] = np.float64(d32[0])
                amax = one_bits[0]
            else:
                for j in range(c):
                    dd = np.float64(f1[j]) - np.float64(
                        g0[j]
                    )  # exact unless exponents differ by > 45
                    dv[j] = dd
                    ss += dd * dd
                amax = np.int64(0)
                for j in range(c):
                    amax = max(amax, di[j] & np.int64(0x7FFFFFFFFFFFFFFF))
            facc[r + 1] += ss
            iacc[r + 1, 1] = max(iacc[r + 1, 1], amax)
        if use_hist and tally:  # <= 4 members: counted in int32 lanes, no histogram
            x1, x2, x3, x4 = i32(0), i32(0), i32(0), i32(0)
            p0, p1, p2, p3, p4, p5 = i32(0), i32(0), i32(0), i32(0), i32(0), i32(0)
            for j in range(c):
                p = pat[j]
                pc = _popcount(p)
                x1 = i32(x1 + i32(pc == i32(1)))
                x2 = i32(x2 + i32(pc == i32(2)))
                x3 = i32(x3 + i32(pc == i32(3)))
                x4 = i32(x4 + i32(pc == i32(4)))
                p0 = i32(p0 + i32(i32(p & i32(3)) == i32(3)))
                p1 = i32(p1 + i32(i32(p & i32(5)) == i32(5)))
                p2 = i32(p2 + i32(i32(p & i32(9)) == i32(9)))
                p3 = i32(p3 + i32(i32(p & i32(6)) == i32(6)))
                p4 = i32(p4 + i32(i32(p & i32(10)) == i32(10)))
                p5 = i32(p5 + i32(i32(p & i32(12)) == i32(12)))
            hist[0, 0] += x1
            hist[0, 1] += x2
            hist[0, 2] += x3
            hist[0, 3] += x4
            hist[1, 0] += p0
            hist[1, 1] += p1
            hist[1, 2] += p2
            hist[1, 3] += p3
            hist[1, 4] += p4
            hist[1, 5] += p5
        elif use_hist and pair:  # two coordinates' patterns per increment: half the increments
            for j in range(0, c8, 8):  # four interleaved histograms: equal neighbours would
                hist[0, pat[j] | (pat[j + 1] << shift)] += 1  # chain their increments otherwise
                hist[1, pat[j + 2] | (pat[j + 3] << shift)] += 1
                hist[2, pat[j + 4] | (pat[j + 5] << shift)] += 1
                hist[3, pat[j + 6] | (pat[j + 7] << shift)] += 1
            for j in range(c8, c):
                hist[4, pat[j]] += 1
        elif use_hist:
            for j in range(0, c4, 4):
                hist[0, pat[j]] += 1
                hist[1, pat[j + 1]] += 1
                hist[2, pat[j + 2]] += 1
                hist[3, pat[j + 3]] += 1
            for j in range(c4, c):
                hist[0, pat[j]] += 1
    _flush(co, col_out, col_edges, grid, cur[0] if use_grid else -1)
    iacc[0, 2] += nf0
    facc[0] += bss


@_jit
def _count_nonfinite(x):  # pragma: no cover - jitted
    """NaN/Inf values among int16 bf16 patterns x."""
    nf = np.int64(0)
    for j in range(x.shape[0]):
        nf += np.int64((np.int32(x[j]) & np.int32(0x7FFF)) >= np.int32(0x7F80))
    return nf


@_jit
def _flush(co, col_out, col_edges, grid, row):  # pragma: no cover - jitted
    """col_out += co, and grid[:, row] += co summed per map column (row < 0: no map); co = 0."""
    R, c = co.shape
    for r in range(R):
        cr = co[r]
        if row >= 0:
            for q in range(col_edges.shape[0] - 1):
                t = np.int64(0)
                for j in range(col_edges[q], col_edges[q + 1]):
                    t += cr[j]
                grid[r, row, q] += t
        out = col_out[r]
        for j in range(c):
            out[j] += cr[j]
            cr[j] = 0
