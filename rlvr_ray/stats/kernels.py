"""The fused CPU pass (numba): a tensor's base and every run's copy, in one pass over its rows.

The torch path in ``masks`` / ``consistency`` (a GPU's) makes 20-40 passes over a chunk per run
(one per eager op); ``group_rows`` decodes each base row once and walks every run's copy of it
while the row's buffers are in L1, with every inner loop written so that LLVM vectorizes it in
int32 lanes (each operation cast back to int32: numba widens them to int64 otherwise) and
without branches; float maxima are taken on integer bit patterns. It computes the same numbers
as the torch path, bit for bit for every count and maximum, and to the last few ulps for the
float64 sums of squares (summation order). Used on CPU when numba imports and
``RLVR_RAY_KERNELS`` is not ``torch`` (``rlvr_ray.stats.group`` drives it). Its speed against
the torch ops is in docs/performance.md.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is a dependency, but the torch path must keep working without it
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None

#: pads the ULP edges to the four columns of ``steps_at_least`` the main loop fills (it counts
#: steps >= 1, 2, 3, 4 itself and never reads these); edges past the fourth are counted in a
#: second loop, only in rows whose largest step reaches them (no step reaches 2^30: steps < 2^17)
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
        from rlvr_ray.probes import numba_without_blas_probe

        numba_without_blas_probe()
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
    cols,
    row0,
    edges,
    member_bit,
    members,
    row_counts,
    col_counts,
    steps_at_least,
    int_stats,
    sumsq,
    hist,
    planes,
    row_bin,
    col_edges,
    grid,
    cur,
):  # pragma: no cover
    """The base and R runs of n rows (n < 2^31) in one pass: every run's mask statistics and
    the runs' consensus pattern, with the base's row decoded once and every row buffer in L1.

    flat: int16 [*], every copy's rows; off: int64 [R + 1], where the n x cols rows of copy k
    (0: the base, r + 1: run r) start in flat; row0: the tensor row of the first of them;
    edges: int32 [k >= 4] ULP bin edges (``padded_edges``); member_bit: int64 [R], run r's bit in
    the consensus pattern (-1: not a member); members: how many runs are. Accumulated across
    calls: row_counts: int64 [R, rows] <- changed per row; col_counts: int64 [R, cols] += changed
    per column; steps_at_least: int64 [R, k] += changes that moved >= edges[b] ULPs; int_stats:
    int64 [R + 1, 3] =
    (max ULP steps, max |update| as float64 bits, NaN/Inf count) (row 0: the base's NaN/Inf);
    sumsq: float64 [R + 1] += sum of squared updates (0: sum of squares of the base);
    hist: int64 [2, 6] (members <= 4: tallies, row 0 += coordinates changed in exactly
    1..4 members, row 1 += both members changed, for the pairs (0,1) (0,2) (0,3) (1,2) (1,3)
    (2,3)), [5, 4^members] (pairs of patterns, members <= 6) or [4, 2^members] += counts
    of the consensus patterns ([4, 1]: none); planes: uint16 [P, n, cols], bit b % 16 of
    planes[b // 16] set where member b changed (P = 0: none); grid: float64 [R, map rows, map
    cols] += changes per block (no rows: no map; row_bin: int64 [rows], each row's map row;
    col_edges: int64 [map cols + 1], where each map column starts; cur: int64 [1], the map
    row being filled).

    Column counts gather in int32 between flushes (each map row, and the call's end).
    """
    R = off.shape[0] - 1
    if cols == 0 or n == 0:
        return
    i32 = np.int32
    n_edges = edges.shape[0]
    base_key = np.empty(cols, np.int32)
    base_bits = np.empty(cols, np.int32)
    base_f32 = base_bits.view(np.float32)
    run_bits = np.empty(cols, np.int32)
    run_f32 = run_bits.view(np.float32)
    diff_bits = np.empty(cols, np.int32)  # |update| as float32 bits
    diff_f32 = diff_bits.view(np.float32)
    diff64 = np.empty(cols, np.float64)
    diff64_bits = diff64.view(np.int64)
    scratch = np.empty(1, np.float64)  # a float64's bits, through memory
    scratch_bits = scratch.view(np.int64)
    patterns = np.zeros(cols, np.int32)
    col_pending = np.zeros((R, cols), np.int32)  # changes per column since the last flush
    use_hist = hist.shape[1] > 1
    pair = hist.shape[0] == 5  # hist: [5, 4^members], pairs of patterns (row 4: single ones)
    tally = hist.shape[0] == 2  # hist: [2, 6], exact counts and pair intersections
    shift = i32(members)
    cols8 = cols - cols % 8
    cols4 = cols - cols % 4
    use_planes = planes.shape[0] > 0
    use_grid = grid.shape[1] > 0
    base_nonfinite = np.int64(0)
    base_sumsq = 0.0
    for i in range(n):
        row = row0 + i
        if use_grid and row_bin[row] != cur[0]:  # a map row is complete: pool its columns
            _flush(col_pending, col_counts, col_edges, grid, cur[0])
            cur[0] = row_bin[row]
        start = off[0] + i * cols
        base_row = flat[start : start + cols]
        max_magnitude = i32(0)
        for j in range(cols):
            base_x = i32(base_row[j])
            base_abs = i32(base_x & i32(0x7FFF))
            max_magnitude = i32(max(max_magnitude, base_abs))
            # ordered keys count representable values; +0 and -0 both map to 0
            base_key[j] = base_x if base_x >= i32(0) else i32(-base_abs)
            base_bits[j] = i32(base_x << i32(16))  # the float32 whose upper half is the bf16 value
        if max_magnitude >= i32(0x7F80):
            base_nonfinite += count_nonfinite(base_row)
        for j in range(cols):
            v = np.float64(base_f32[j])
            base_sumsq += v * v
        if use_hist:
            for j in range(cols):
                patterns[j] = i32(0)
        for r in range(R):
            start = off[r + 1] + i * cols
            run_row = flat[start : start + cols]
            pending = col_pending[r]
            b = member_bit[r]
            # this run's bit of the consensus pattern (0: not a member)
            member_mask = i32(i32(1) << i32(b)) if b >= 0 and use_hist else i32(0)
            n_changed = i32(0)
            sum_min2 = i32(0)
            sum_min3 = i32(0)
            sum_min4 = i32(0)
            max_steps = i32(0)
            max_magnitude = i32(0)
            # every operation cast back to int32: numba widens int32 arithmetic to int64,
            # and LLVM then vectorizes in half as many lanes (or not at all)
            for j in range(cols):
                run_x = i32(run_row[j])
                run_abs = i32(run_x & i32(0x7FFF))
                max_magnitude = i32(max(max_magnitude, run_abs))
                run_key = run_x if run_x >= i32(0) else i32(-run_abs)
                key_diff = i32(run_key - base_key[j])
                steps = i32(max(key_diff, i32(-key_diff)))
                moved = i32(steps != i32(0))
                n_changed = i32(n_changed + moved)
                pending[j] = i32(pending[j] + moved)
                # a masked OR: a shift by a variable count is done in int64 lanes otherwise
                patterns[j] = i32(patterns[j] | i32(i32(-moved) & member_mask))
                # sums of min(steps, k): steps >= k counted as their differences, in half
                # the instructions of a compare and a count (cols < 2^29: no overflow)
                sum_min2 = i32(sum_min2 + i32(min(steps, i32(2))))
                sum_min3 = i32(sum_min3 + i32(min(steps, i32(3))))
                sum_min4 = i32(sum_min4 + i32(min(steps, i32(4))))
                max_steps = i32(max(max_steps, steps))
                run_bits[j] = i32(run_x << i32(16))
            if max_magnitude >= i32(0x7F80):  # NaN/Inf in this row of the run: count them
                int_stats[r + 1, 2] += count_nonfinite(run_row)
            if b >= 0 and use_planes:  # > 16 members: bit planes
                plane_bit = np.uint16(1 << (b % 16))
                plane = b // 16
                for j in range(cols):
                    run_x = i32(run_row[j])
                    run_key = run_x if run_x >= i32(0) else i32(-i32(run_x & i32(0x7FFF)))
                    planes[plane, i, j] |= np.uint16(run_key != base_key[j]) * plane_bit
            row_counts[r, row] = n_changed
            steps_at_least[r, 0] += n_changed
            steps_at_least[r, 1] += sum_min2 - n_changed  # steps >= 2
            steps_at_least[r, 2] += sum_min3 - sum_min2  # >= 3
            steps_at_least[r, 3] += sum_min4 - sum_min3  # >= 4
            if n_edges > 4 and max_steps >= edges[4]:  # rare for RL: steps of 5+ ULPs in this row
                for bin_index in range(4, n_edges):
                    edge = i32(edges[bin_index])
                    n_at_least = i32(0)
                    for j in range(cols):
                        run_x = i32(run_row[j])
                        run_key = run_x if run_x >= i32(0) else i32(-i32(run_x & i32(0x7FFF)))
                        key_diff = i32(run_key - base_key[j])
                        n_at_least = i32(
                            n_at_least + i32(i32(max(key_diff, i32(-key_diff))) >= edge)
                        )
                    steps_at_least[r, bin_index] += n_at_least
            int_stats[r + 1, 0] = max(int_stats[r + 1, 0], max_steps)
            run_sumsq = 0.0
            if max_steps < 1024:
                # keys < 1024 apart: exponents within 8 of each other (or both values tiny),
                # so the float32 difference of the two bf16 values is exact, as is its square
                # in float64 (the general path's numbers, at less work)
                for j in range(cols):
                    diff32 = run_f32[j] - base_f32[j]
                    diff_f32[j] = diff32
                    diff = np.float64(diff32)
                    run_sumsq += diff * diff
                max_diff_bits = i32(0)
                # |difference| is ordered like its bit pattern with the sign cleared
                for j in range(cols):
                    max_diff_bits = i32(max(max_diff_bits, i32(diff_bits[j] & i32(0x7FFFFFFF))))
                diff_bits[0] = max_diff_bits
                scratch[0] = np.float64(diff_f32[0])
                max_abs_bits = scratch_bits[0]
            else:
                # exact unless the exponents differ by > 45
                for j in range(cols):
                    diff = np.float64(run_f32[j]) - np.float64(base_f32[j])
                    diff64[j] = diff
                    run_sumsq += diff * diff
                max_abs_bits = np.int64(0)
                for j in range(cols):
                    max_abs_bits = max(max_abs_bits, diff64_bits[j] & np.int64(0x7FFFFFFFFFFFFFFF))
            sumsq[r + 1] += run_sumsq
            int_stats[r + 1, 1] = max(int_stats[r + 1, 1], max_abs_bits)
        if use_hist and tally:  # <= 4 members: counted in int32 lanes, no histogram
            exactly1, exactly2, exactly3, exactly4 = i32(0), i32(0), i32(0), i32(0)
            both01, both02, both03 = i32(0), i32(0), i32(0)  # pairs of members (0, 1), ...
            both12, both13, both23 = i32(0), i32(0), i32(0)
            for j in range(cols):
                member_set = patterns[j]
                n_members = _popcount(member_set)
                exactly1 = i32(exactly1 + i32(n_members == i32(1)))
                exactly2 = i32(exactly2 + i32(n_members == i32(2)))
                exactly3 = i32(exactly3 + i32(n_members == i32(3)))
                exactly4 = i32(exactly4 + i32(n_members == i32(4)))
                both01 = i32(both01 + i32(i32(member_set & i32(3)) == i32(3)))
                both02 = i32(both02 + i32(i32(member_set & i32(5)) == i32(5)))
                both03 = i32(both03 + i32(i32(member_set & i32(9)) == i32(9)))
                both12 = i32(both12 + i32(i32(member_set & i32(6)) == i32(6)))
                both13 = i32(both13 + i32(i32(member_set & i32(10)) == i32(10)))
                both23 = i32(both23 + i32(i32(member_set & i32(12)) == i32(12)))
            hist[0, 0] += exactly1
            hist[0, 1] += exactly2
            hist[0, 2] += exactly3
            hist[0, 3] += exactly4
            hist[1, 0] += both01
            hist[1, 1] += both02
            hist[1, 2] += both03
            hist[1, 3] += both12
            hist[1, 4] += both13
            hist[1, 5] += both23
        elif use_hist and pair:  # two coordinates' patterns per increment: half the increments
            # four interleaved histograms: equal neighbours would chain their increments otherwise
            for j in range(0, cols8, 8):
                hist[0, patterns[j] | (patterns[j + 1] << shift)] += 1
                hist[1, patterns[j + 2] | (patterns[j + 3] << shift)] += 1
                hist[2, patterns[j + 4] | (patterns[j + 5] << shift)] += 1
                hist[3, patterns[j + 6] | (patterns[j + 7] << shift)] += 1
            for j in range(cols8, cols):
                hist[4, patterns[j]] += 1
        elif use_hist:
            for j in range(0, cols4, 4):
                hist[0, patterns[j]] += 1
                hist[1, patterns[j + 1]] += 1
                hist[2, patterns[j + 2]] += 1
                hist[3, patterns[j + 3]] += 1
            for j in range(cols4, cols):
                hist[0, patterns[j]] += 1
    _flush(col_pending, col_counts, col_edges, grid, cur[0] if use_grid else -1)
    int_stats[0, 2] += base_nonfinite
    sumsq[0] += base_sumsq


@_jit
def count_nonfinite(x):  # pragma: no cover - jitted
    """NaN/Inf values among int16 bf16 patterns x [n] (also the worker's count over a copy's
    arena slot, on the error path)."""
    nf = np.int64(0)
    for j in range(x.shape[0]):
        nf += np.int64((np.int32(x[j]) & np.int32(0x7FFF)) >= np.int32(0x7F80))
    return nf


@_jit
def _flush(col_pending, col_counts, col_edges, grid, row):  # pragma: no cover - jitted
    """col_counts += col_pending, and grid[:, row] += col_pending summed per map column (row < 0:
    no map); col_pending = 0."""
    R, cols = col_pending.shape
    for r in range(R):
        pending = col_pending[r]
        if row >= 0:
            for bin_index in range(col_edges.shape[0] - 1):
                total = np.int64(0)
                for j in range(col_edges[bin_index], col_edges[bin_index + 1]):
                    total += pending[j]
                grid[r, row, bin_index] += total
        out = col_counts[r]
        for j in range(cols):
            out[j] += pending[j]
            pending[j] = 0
