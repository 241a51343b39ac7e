"""What an actor holds for one tensor, and the memory estimate the driver checks units against.

Pure arithmetic on shapes and byte counts (no torch, no numba): the driver refuses a unit whose
largest tensor would not fit ``--memory-gb`` before any actor starts. The worker takes its
buffer sizes from the constants here, so the estimate and what the worker allocates follow
one another. Every term of :func:`tensor_memory` is an allocation of the worker's, in bytes:

- the copies: every checkpoint's copy of the tensor read whole (a tensor that gets an SVD), or
  two read windows per copy (one computed on, the next being read) for a streamed one; a copy
  not stored as bf16 also holds its bf16 patterns (2 bytes an element);
- the pass's scratch: a row chunk's temporaries in the torch path (int32 keys and steps,
  float32 mask, float64 differences), and beyond 16 runs the consensus product's float32
  [runs, piece] matrix; per-run row and column vectors (counts, ratios, profile rows);
- the geometry stage (a tensor that gets an SVD): the float64 copy of W0, its Gram matrix and
  ``eigh``'s workspace, the float64 rank-k reconstruction W0_k with the selection's copy and
  ranks, the masks; then for each run the float64 W1, its Gram, ``eigvalsh`` and the top-k
  iteration's blocks (or ``eigh`` again where the iteration cannot certify its bound).

The coefficients were fitted on measured peaks (the worker run directly, the process's peak
resident memory above its baseline; ``tests/engine/test_memory.py``) with a margin above
every one of them, and the test keeps them an upper bound.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlvr_ray.engine.config import Params
    from rlvr_ray.engine.plan import TensorSpec, Unit

#: elements per row chunk of the torch path on a CPU: scratch stays in L2 (measured best of
#: 2^16..2^20) and float32 0/1 sums stay exact (< 2^24)
CHUNK_NUMEL = 1 << 18
#: on a GPU each chunk is a handful of kernel launches and host syncs: make them worth it
GPU_CHUNK_NUMEL = 1 << 22
#: a streamed tensor is read this many elements (of each copy) at a time
STREAM_WINDOW_NUMEL = 1 << 22
#: the fused CPU pass reads the copies' rows a window at a time, straight into one buffer that
#: stays in the caches (L2 + L3) while the pass walks it: FUSED_ARENA_NUMEL elements over all
#: copies (4 MiB), at least FUSED_WINDOW_NUMEL of each. A pair's windows are 2^20 elements: 0.94x
#: the wall time of a 1.5B pair's scan in 2^18 windows (each window costs a kernel call and a
#: read per copy from Python); a base and 4 runs' (2^19) were level with 2^18
FUSED_WINDOW_NUMEL = 1 << 18
FUSED_ARENA_NUMEL = 1 << 21
#: tensors this large (bytes) that get no SVD are streamed rather than read whole
STREAM_MIN_BYTES = 16 << 20
EMBEDDING_ROLES = ("embed", "lm_head")
#: allocations this large (bytes) get their own mapping, given back when freed (the worker sets
#: it at start): glibc otherwise raises its threshold up to 32 MiB and keeps freed scratch in
#: its heaps, where a tensor's per-run scratch piled up (17 runs of a 32769 x 256 tensor: a
#: 1.18 GB peak instead of 0.60 GB), beyond what the estimate counts
MMAP_THRESHOLD = 4 << 20

#: bytes per element of a torch-path row chunk's temporaries (keys, steps, mask, differences)
CHUNK_SCRATCH_BYTES = 128
#: the consensus product beyond 16 runs: coordinates per piece (a CPU's) and bytes per run
#: and coordinate (the float32 0/1 matrix, and its bit planes and counts)
PIECE_NUMEL = 1 << 18
PIECE_RUN_BYTES = 8
#: bytes per run per row and per column: counts, ratios and profile rows of every run
RUN_VECTOR_BYTES = 64
#: geometry: bytes per element of the base stage (float64 W0_k, its selection's copy and
#: ranks, the masks) and of a run's (float64 W1, the update mask, the overlaps' masks)
GEOMETRY_ELEMENT_BYTES = 32
#: geometry: bytes per entry of a p x p matrix (p = the short side): the Gram matrix, eigh's
#: copy, workspace and vectors (the base's, or a run's that falls back to eigh)
GEOMETRY_GRAM_BYTES = 64


def skip_reason(params: Params, role: str, shape: tuple[int, ...]) -> str | None:
    """None if the tensor gets geometry, else the geometry_status saying why not."""
    if not params.geometry:
        return "disabled"
    if len(shape) != 2:
        return "skipped_vector" if len(shape) < 2 else "skipped_not_matrix"
    if min(shape) == 1:  # a row or a column (Qwen2-MoE's shared-expert gate): rank 1, no k
        return "skipped_vector"
    if role == "scale":  # an FP8 weight's block scales: the weight's bookkeeping, not a layer
        return "skipped_scale"
    if role in EMBEDDING_ROLES and not params.svd_embeddings:
        return "skipped_embedding"
    if shape[0] * shape[1] > params.max_svd_numel:
        return "skipped_size"
    return None


def streams(params: Params, role: str, shape: tuple[int, ...], nbytes: int) -> bool:
    """Whether a tensor (one copy: ``nbytes``) is streamed row range by row range rather than
    read whole by the torch path: huge tensors that get no SVD. (The fused CPU pass streams
    every tensor that gets no SVD.)"""
    return nbytes >= STREAM_MIN_BYTES and skip_reason(params, role, tuple(shape)) is not None


def tensor_memory(spec: TensorSpec, n_copies: int, params: Params) -> int:
    """Bytes an actor needs for one tensor of ``n_copies`` copies (the base and its runs):
    the largest over the worker's paths (the fused CPU pass, the torch path) of the copies,
    the pass's scratch and, for a tensor that gets an SVD, the geometry stage's scratch."""
    numel = max(math.prod(spec.shape), 1)
    rows = spec.shape[0] if len(spec.shape) >= 2 else 1
    cols = numel // max(rows, 1)
    runs = max(n_copies - 1, 1)
    one = spec.nbytes / max(n_copies, 1)  # one copy's stored bytes
    per_element = one / numel + (2 if one != 2 * numel else 0)  # + bf16 patterns if rounded
    geometry = skip_reason(params, spec.role, tuple(spec.shape)) is None
    if geometry or not streams(params, spec.role, spec.shape, int(one)):
        copies = n_copies * per_element * numel  # read whole
    else:  # two windows per copy (whole rows: at least one row each)
        window = max(STREAM_WINDOW_NUMEL // max(cols, 1), 1) * cols
        copies = n_copies * 2 * per_element * min(window, numel)
    chunk = min(max(CHUNK_NUMEL, cols), numel)  # a torch-path chunk holds whole rows
    scratch = CHUNK_SCRATCH_BYTES * chunk + RUN_VECTOR_BYTES * runs * (rows + cols)
    if runs > 16:
        scratch += PIECE_RUN_BYTES * (runs + 4) * min(PIECE_NUMEL, numel)
    if geometry:
        p = min(rows, cols)
        scratch += GEOMETRY_ELEMENT_BYTES * numel + GEOMETRY_GRAM_BYTES * p * p
    return int(copies + scratch)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def over_budget(units: list[Unit], memory_gb: float) -> tuple[list[Unit], list[str]]:
    """Split ``units`` into those that fit ``memory_gb`` per actor and errors for the rest.

    An actor holds one tensor at a time, so a unit needs what its largest tensor needs; a
    tensor cannot be split (its statistics need every run's copy together), so a unit with a
    tensor over the budget is refused, named, and left for a rerun with a larger budget.
    """
    budget = memory_gb * 2**30
    fit, errors = [], []
    for u in units:
        need, spec = max(
            ((tensor_memory(t, len(u.runs) + 1, u.params), t) for t in u.tensors),
            key=lambda x: x[0],
        )
        if need <= budget:
            fit.append(u)
            continue
        copies = len(u.runs) + 1
        errors.append(
            f"group {u.group}: unit {u.index} refused: tensor {spec.name} needs {_size(need)} "
            f"({copies} copies x {_size(spec.nbytes / copies)} + scratch) > --memory-gb "
            f"{memory_gb:g}; rerun with a larger --memory-gb (done units are kept)"
        )
    return fit, errors
