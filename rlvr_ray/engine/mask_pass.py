"""The mask pass over one tensor: every run's copy against the base's, row range by row range.

Two implementations with one result. On a CPU with the numba kernels, ``group_pass`` takes the
base and every run at once in one fused kernel pass per window of rows, read straight into the
arena (``rlvr_ray.stats.group``). Elsewhere (a GPU, ``RLVR_RAY_KERNELS=torch``, rows wider
than the kernel counts) ``chunk_pass`` walks row chunks with sync-free torch ops that accumulate
per-run mask statistics and the cross-run consensus. Either way scratch is a chunk or a window,
not a tensor. Both raise ``NonFinite`` naming the first copy holding NaN/Inf and ``ReadFailed``
for a copy that cannot be read: the caller drops that run and redoes the pass. The fused pass
runs on numpy arrays; torch is imported by ``chunk_pass`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rlvr_ray.engine.source import Source, reading
from rlvr_ray.io.schema import ULP_BIN_EDGES
from rlvr_ray.stats.group import GroupAccumulator
from rlvr_ray.stats.records import ConsistencyStats, MaskStats

if TYPE_CHECKING:
    import torch


class NonFinite(Exception):
    """A chunk of ``src`` (the base's or a run's copy) held NaN/Inf."""

    def __init__(self, src: Source):
        super().__init__(src.name)
        self.src = src


@dataclass
class Consensus:
    """A tensor's cross-run statistics over the runs in the group's consistency."""

    numel: int
    members: list[int]  # run indices (into the unit's runs)
    stats: ConsistencyStats
    is_matrix: bool


@dataclass
class MaskResult:
    """What a mask pass measured: per run index (MaskStats, the base's sum of squares over the
    rows compared), and the consensus of the runs in consistency (None: fewer than 2)."""

    runs: dict[int, tuple[MaskStats, float]]
    consensus: Consensus | None


def _members(runs: list[tuple[int, Source]], in_consistency: list[bool], consensus: bool):
    """Positions in ``runs`` of the runs in the consensus (none unless at least 2)."""
    members = [k for k, (run, _) in enumerate(runs) if in_consistency[run]]
    return members if consensus and len(members) >= 2 else []


def chunk_pass(
    ctx,
    base: Source,
    runs: list[tuple[int, Source]],
    in_consistency: list[bool],
    is_matrix: bool,
    map_size: int | None,
    consensus: bool = True,
) -> MaskResult:
    """The torch pass over row chunks of ``base`` and each (run index, source) of ``runs``.
    ``ctx``: the worker's pass context (device, chunk size, reading pool, byte count);
    ``in_consistency``: per run index, whether it is in the consensus; ``is_matrix``: rows
    and columns mean something (profiles, a pooled map of ``map_size``)."""
    if not runs:
        return MaskResult({}, None)
    from rlvr_ray.stats.consistency import ConsistencyAccumulator
    from rlvr_ray.stats.masks import MaskAccumulator, base_stats

    rows, cols = base.shape
    map_size = map_size if is_matrix else None
    device = ctx.device
    accs = [MaskAccumulator(rows, cols, ULP_BIN_EDGES, device, map_size) for _ in runs]
    step = max(1, ctx.chunk_numel // max(cols, 1))  # rows per chunk
    edges = [*range(0, rows, step), rows]
    members = _members(runs, in_consistency, consensus)
    cons = ConsistencyAccumulator(len(members), rows, cols, device) if members else None
    bit = {k: i for i, k in enumerate(members)}
    base_sumsq = base_nonfinite = 0
    sources = [base, *(src for _, src in runs)]
    for src in sources:  # a window may share its buffers with another pass's (head())
        src.start(edges)
    try:
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            base_rows, *run_rows = _rows(ctx, sources, a, b)
            sumsq, nonfinite = base_stats(base_rows)
            base_sumsq, base_nonfinite = base_sumsq + sumsq, base_nonfinite + nonfinite
            planes = cons.planes(b - a) if cons is not None else None
            for k, (acc, x) in enumerate(zip(accs, run_rows, strict=True)):
                acc.add(base_rows, x, planes, bit.get(k, -1))
            if cons is not None:
                cons.add(planes)
            if device.type == "cpu" and (base_nonfinite or any(m.nonfinite() for m in accs)):
                break  # stop early where checking is free; a GPU checks once, at the end
    finally:
        for src in sources:  # no read may still be writing into a buffer after the pass
            src.stop()
    if int(base_nonfinite):
        raise NonFinite(base)
    for acc, (_, src) in zip(accs, runs, strict=True):
        if acc.nonfinite():
            raise NonFinite(src)
    base_sumsq = float(base_sumsq)
    consensus_out = None
    if cons is not None:
        mem = [accs[k] for k in members]
        pooled = (
            (sum(m.pool.sums() for m in mem), mem[0].pool.blocks()) if map_size else (None,) * 2
        )
        row_sum, col_sum = sum(m.row_counts for m in mem), sum(m.col_counts for m in mem)
        stats = cons.finish(row_sum, col_sum, *pooled)
        consensus_out = Consensus(rows * cols, [runs[k][0] for k in members], stats, is_matrix)
    measured = {run: (acc.finish(), base_sumsq) for acc, (run, _) in zip(accs, runs, strict=True)}
    return MaskResult(measured, consensus_out)


def group_pass(
    ctx,
    base: Source,
    runs: list[tuple[int, Source]],
    in_consistency: list[bool],
    is_matrix: bool,
    map_size: int | None,
    consensus: bool = True,
) -> MaskResult:
    """The fused CPU pass: the base and every run in one kernel pass per window of rows (read
    straight into the arena, in this thread) or over the copies read whole -> what
    ``chunk_pass`` returns."""
    if not runs:
        return MaskResult({}, None)
    rows, cols = base.shape
    map_size = map_size if is_matrix else None
    members = _members(runs, in_consistency, consensus)
    acc = GroupAccumulator(rows, cols, len(runs), members, ULP_BIN_EDGES, map_size)
    sources = [base, *(src for _, src in runs)]
    buffers = ctx.buffers
    flat = buffers.arena
    offsets = np.array([s.slot * buffers.slot_numel for s in sources], dtype=np.int64)
    if base.full is not None:  # read whole (for the SVD): one pass over all of it
        acc.add(flat, offsets, rows)
    else:
        step = max(1, buffers.slot_numel // max(cols, 1))  # rows per window: a slot's
        reads = [s.window_reader(buffers.slot(s.slot)) for s in sources]
        for a in range(0, rows, step):
            b = min(a + step, rows)
            for src, read in zip(sources, reads, strict=True):
                ctx.n_bytes += reading(src, read, a, b)
            acc.add(flat, offsets, b - a)
            if acc.any_nonfinite:
                break  # stop early: the pass is redone without the copy holding NaN/Inf
    if acc.nonfinite(0):
        raise NonFinite(base)
    for k, (_, src) in enumerate(runs):
        if acc.nonfinite(k + 1):
            raise NonFinite(src)
    acc.finish()
    stats = acc.consistency()
    consensus_out = None
    if stats is not None:
        consensus_out = Consensus(rows * cols, [runs[k][0] for k in members], stats, is_matrix)
    measured = {run: (acc.mask_stats(k), acc.base_sumsq) for k, (run, _) in enumerate(runs)}
    return MaskResult(measured, consensus_out)


def _rows(ctx, sources: list[Source], a: int, b: int) -> list[torch.Tensor]:
    """Rows [a, b) of every source; streamed ones are read side by side."""
    need = [s for s in sources if not s.in_memory(a, b)]
    if need:  # a new window for each streamed copy: the prefetched one, else read now
        ctx.n_bytes += sum(s.needs_read(a, b) for s in need)
        for s, fetched in [(s, s.fetch(a, b, ctx.io)) for s in need]:
            reading(s, s.install, fetched, ctx.io)
    return [reading(s, s.rows, a, b) for s in sources]
