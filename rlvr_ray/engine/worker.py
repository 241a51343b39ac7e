"""The scan worker: a plain class that scans one work unit and writes its Parquet parts.

It becomes a Ray actor only at the edge (``rlvr_ray.engine.driver``); tests call it directly.
For each tensor of the unit it reads the base once and every run's copy. On a CPU (numba) one
fused pass takes the base and every run at once (``rlvr_ray.stats.group``): a tensor that gets
no SVD is read window by window, each copy's rows straight into its slot of one cache-sized
buffer, and one that does is read whole into the slots, side by side on a small thread pool.
Elsewhere (a GPU, or ``RLVR_RAY_KERNELS=torch``) the copies are read whole or, for huge tensors
that get no SVD, streamed in windows read ahead, and sync-free torch ops accumulate per-run mask
statistics and the cross-run consensus chunk by chunk. Either way at most (runs + 1) x the
tensor's bytes are resident, and scratch is a chunk, not a tensor. A tensor that cannot be
compared gets a row whose ``status`` says why.

FP8 copies (F8_E4M3, F8_E5M2) are compared in their own 8-bit patterns (``fp8_bits``), and the
value statistics (``rel_frob``, ``max_abs_update``) of an FP8 tensor come from a second pass over
its values dequantized with each copy's block scales (``<name>_scale_inv`` / ``<name>_scale``).
A fused expert tensor [experts, rows, cols] is scanned as one matrix per expert (its
``TensorSpec.expert``): rows ``expert * rows`` onward of the tensor viewed as [experts * rows,
cols].
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from rlvr_ray.engine.gate import PrecisionGate
from rlvr_ray.engine.geometry import BaseCache, row_columns, spectra_rows
from rlvr_ray.engine.memory import (
    CHUNK_NUMEL,
    FUSED_WINDOW_NUMEL,
    GPU_CHUNK_NUMEL,
    MMAP_THRESHOLD,
    STREAM_WINDOW_NUMEL,
    skip_reason,
    streams,
)
from rlvr_ray.engine.plan import RunSpec, TensorSpec, Unit
from rlvr_ray.io.checkpoint import (
    DTYPES,
    FLOAT_DTYPES,
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    torch_dtype,
)
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import TABLES, ULP_BIN_EDGES
from rlvr_ray.stats import kernels
from rlvr_ray.stats.consistency import ConsistencyAccumulator, ConsistencyStats
from rlvr_ray.stats.group import MAX_COLS, GroupAccumulator
from rlvr_ray.stats.masks import (
    MaskAccumulator,
    MaskStats,
    base_stats,
    compare_bits,
    gini_counts,
    nonfinite_count,
    update_mask,
)
from rlvr_ray.stats.spectral import run_geometry  # fmt: skip
from rlvr_ray.stats.update import update_geometry

#: status -> meaning (also in the README's table docs)
STATUSES = {
    "ok": "compared",
    "vocab_resized": "first dimension differs (resized vocabulary): the common rows compared",
    "missing_in_run": "tensor not in the run",
    "missing_in_base": "tensor in the run but not in the base",
    "shape_mismatch": "shapes differ beyond the first dimension; not compared",
    "unsupported_dtype": "not a float tensor; not compared",
    "dtype_mismatch": "FP8 in one copy, another dtype (or FP8 format) in the other; not compared",
    "empty": "the base's tensor has no elements (a 0 in its shape); nothing to compare or read",
    "nonfinite": "NaN or Inf in base or run; not compared",
    "read_error": "the tensor's bytes could not be read",
}
COMPARED = ("ok", "vocab_resized")
#: FP8 storage dtypes: compared in their own 8-bit patterns, never rounded to bf16
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
COMPARABLE_DTYPES = (*FLOAT_DTYPES, *FP8_DTYPES)
#: names of an FP8 weight's scale tensor: ``<weight name><suffix>`` (W = fp8 value x scale)
SCALE_SUFFIXES = ("_scale_inv", "_scale")
#: concurrent reads per worker: the base's and the runs' copies of a tensor
IO_THREADS = 8


def piece_shape(shape: tuple[int, ...], expert: int | None) -> tuple[int, ...]:
    """The shape of what is compared: the tensor's, or one expert's of a fused expert tensor."""
    return tuple(shape) if expert is None else tuple(shape[1:])


def piece_layout(shape: tuple[int, ...], expert: int | None) -> tuple[int, int, int]:
    """-> (first row, rows, cols) of the compared piece in the tensor's 2-D view: [shape[0],
    rest] for a whole tensor (a vector is one row); [experts * shape[1], rest] for expert
    ``expert``'s matrix of a fused [experts, rows, ...] tensor ([experts, n]: a vector each)."""
    if expert is None:
        rows = shape[0] if len(shape) >= 2 else 1
        return 0, rows, math.prod(shape) // max(rows, 1)
    rows = shape[1] if len(shape) >= 3 else 1
    return expert * rows, rows, math.prod(shape[1:]) // max(rows, 1)


@dataclass
class _Compared:
    run: int
    src: _Source  # the run's rows (common rows only when the vocabulary was resized)
    status: str = "ok"
    message: str | None = None


class _NonFinite(Exception):
    """A chunk of ``src`` (the base's or a run's source) held NaN/Inf."""

    def __init__(self, src: _Source):
        super().__init__(src.name)
        self.src = src


class _ReadFailed(Exception):
    """Rows of ``src`` could not be read mid-pass (the file changed or failed under the scan)."""

    def __init__(self, src: _Source, message: str):
        super().__init__(message)
        self.src, self.message = src, message


def _reading(src: _Source, read, *args):
    """read(*args), a failure to read becoming _ReadFailed(src)."""
    try:
        return read(*args)
    except CheckpointError as e:
        raise _ReadFailed(src, str(e)) from None


class _Source:
    """One checkpoint's tensor (or one expert's matrix of it) as int16 patterns [rows, cols]
    (bf16, or FP8 by ``fp8_bits``), row range by row range.

    Either read whole into a reused buffer (tensors that get geometry, and small ones), or
    streamed: read from the file a window of rows at a time, so a huge tensor (an embedding)
    costs (runs + 1) x 2 windows of memory instead of (runs + 1) tensors. Windows end on chunk
    edges, and while the chunks of one window are computed on, the next window is read into
    the other of two buffers (``prefetch``), so reading overlaps the statistics."""

    def __init__(self, worker: ScanWorker, ck: Checkpoint, name: str, slot: int, stream: bool,
                 limit: int | None = None, fused: bool = False,
                 expert: int | None = None):  # fmt: skip
        e = ck.entries[name]
        self.worker, self.ck, self.name, self.slot, self.stream = worker, ck, name, slot, stream
        self.fused = fused  # read for the fused CPU pass: into the worker's slots
        self.expert = expert
        self.row0, rows, cols = piece_layout(e.shape, expert)
        self._rows = rows
        self.shape = (min(rows, limit) if limit is not None else rows, cols)
        self.dtype = e.dtype  # storage dtype: BF16 is read as it is, anything else converted
        self.converted = e.dtype != "BF16"
        self.rounded = e.dtype not in ("BF16", *FP8_DTYPES)  # FP8 keeps its own patterns
        self.full: torch.Tensor | None = None
        self.edges: list[int] = []  # the pass's chunk edges: windows end on them
        self.window: tuple[int, int, torch.Tensor, int] | None = None  # a, end, rows, buffer
        self.pending: tuple[int, int, Future, int] | None = None  # the next window, being read

    @property
    def stored_rows(self) -> int:
        """Rows in the file (more than ``shape[0]`` when a resized vocabulary is cut)."""
        return self._rows

    def stored(self, a: int, b: int, key, device: torch.device | None = None) -> torch.Tensor:
        """Rows [a, b) in the stored dtype, [b - a, cols], read into buffer ``key`` (then moved
        to ``device``, if a GPU)."""
        e = self.ck.entries[self.name]
        dtype, size = torch_dtype(e.dtype)
        n = self.nbytes(a, b)
        buf = self.worker.buffer(key, n)[:n]
        if n:
            start = (self.row0 + a) * self.shape[1] * size
            self.ck.read_exact(e, start, memoryview(buf.numpy()))
        t = buf.view(dtype).reshape(b - a, self.shape[1])
        if device is not None and device.type == "cuda":
            t = t.to(device, non_blocking=True)
            self.worker.copied(key)
        return t

    def read_into(self, a: int, b: int, dst: torch.Tensor) -> int:
        """Rows [a, b) as int16 patterns into the flat int16 ``dst`` (any thread; the fused CPU
        pass) -> bytes read. A copy not stored as bf16 is read aside and converted into it."""
        n = (b - a) * self.shape[1]
        if not self.converted:
            e = self.ck.entries[self.name]
            start = (self.row0 + a) * 2 * self.shape[1]
            self.ck.read_exact(e, start, memoryview(dst[:n].numpy()).cast("B"))
            return 2 * n
        raw = self.stored(a, b, ("raw", self.slot))
        dst[:n].copy_(compare_bits(raw)[0].reshape(-1))
        return self.nbytes(a, b)

    def window_reader(self, dst: torch.Tensor):
        """-> read(a, b): rows [a, b) into the start of ``dst`` (int16, flat) -> bytes read.
        The fused pass reads every window of every copy through it: for a bf16 copy nothing
        but the system call (anything unusual takes ``read_into``, which says what went wrong)."""
        if self.converted:
            return lambda a, b: self.read_into(a, b, dst)
        fd, start = self.ck.locate(self.name)
        row = 2 * self.shape[1]
        start += self.row0 * row
        view = memoryview(dst.numpy()).cast("B")

        def read(a: int, b: int) -> int:
            n = (b - a) * row
            try:
                if os.preadv(fd, [view[:n]], start + a * row) == n:
                    return n
            except OSError:
                pass
            return self.read_into(a, b, dst)

        return read

    def load(self) -> int:
        """Read the whole tensor unless it is streamed (any thread) -> bytes read."""
        if self.stream:
            return 0
        if self.fused:  # into the copy's slot of the worker's one buffer
            rows = self.stored_rows
            dst = self.worker.slot(self.slot)
            n = self.read_into(0, rows, dst)
            self.full = dst[: rows * self.shape[1]].view(rows, self.shape[1])[: self.shape[0]]
            return n
        raw = self.stored(0, self.stored_rows, ("full", self.slot), self.worker.device)
        self.full = compare_bits(raw)[0][: self.shape[0]]
        return self.nbytes(0, self.stored_rows)

    def nbytes(self, a: int, b: int) -> int:
        """Bytes of rows [a, b) in the file."""
        e = self.ck.entries[self.name]
        return (b - a) * self.shape[1] * (e.nbytes // max(e.numel, 1))

    def head(self, n: int) -> _Source:
        """The first n rows (a resized vocabulary's common rows), sharing what was read."""
        other = object.__new__(_Source)
        other.__dict__.update(self.__dict__)
        other.shape = (min(n, self.shape[0]), self.shape[1])
        other.full = self.full[:n] if self.full is not None else None
        other.window = other.pending = None
        return other

    # -- streamed windows ----------------------------------------------------------------------

    def start(self, edges: list[int]) -> None:
        """A pass over chunks ``edges`` begins: nothing read before is served."""
        self.stop()
        self.edges, self.window = edges, None

    def stop(self) -> None:
        """Wait for a window still being read (its buffer is about to be reused) and drop it."""
        if self.pending is not None:
            self.pending[2].exception()  # waits; a failed prefetch is read again, or raises, later
            self.pending = None

    def _read(self, a: int, end: int, buf: int) -> torch.Tensor:
        """Rows [a, end) into buffer ``buf`` (0 or 1), on the worker's device (any thread)."""
        data = self.stored(a, end, ("chunk", self.slot, buf), self.worker.device)
        return compare_bits(data)[0]

    def fetch(self, a: int, b: int, pool: ThreadPoolExecutor) -> tuple[int, int, Future, int]:
        """The window serving rows [a, b): the prefetched one, or a read submitted now."""
        end = self._window_end(a, b)
        if self.pending is not None and self.pending[:2] == (a, end):
            got, self.pending = self.pending, None
            return got
        self.stop()
        buf = 1 - self.window[3] if self.window is not None else 0
        return a, end, pool.submit(self._read, a, end, buf), buf

    def install(self, fetched: tuple[int, int, Future, int], pool: ThreadPoolExecutor) -> None:
        """Serve from ``fetched`` (waits for it); start reading the window after it."""
        a, end, future, buf = fetched
        self.window = (a, end, future.result(), buf)
        if end < self.shape[0]:
            i = bisect.bisect_right(self.edges, end)
            nb = self.edges[i] if i < len(self.edges) else self.shape[0]
            nend = self._window_end(end, nb)
            self.pending = (end, nend, pool.submit(self._read, end, nend, 1 - buf), 1 - buf)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as int16 patterns (a window not in memory is read here, synchronously)."""
        if self.full is not None:
            return self.full[a:b]
        if not self._in_memory(a, b):
            self.stop()
            end = self._window_end(a, b)
            buf = 1 - self.window[3] if self.window is not None else 0
            self.window = (a, end, self._read(a, end, buf), buf)
        w0, _, data, _ = self.window
        return data[a - w0 : b - w0]

    def needs_read(self, a: int, b: int) -> int:
        """Bytes that serving rows [a, b) reads from the file (0: in memory already)."""
        return 0 if self._in_memory(a, b) else self.nbytes(a, self._window_end(a, b))

    def _in_memory(self, a: int, b: int) -> bool:
        w = self.window
        return self.full is not None or (w is not None and w[0] <= a and b <= w[1])

    def _window_end(self, a: int, b: int) -> int:
        """End row of the window read to serve rows [a, b): the last chunk edge within
        STREAM_WINDOW_NUMEL elements of a (so the next window starts a chunk), and >= b."""
        limit = a + STREAM_WINDOW_NUMEL // max(self.shape[1], 1)
        i = bisect.bisect_right(self.edges, limit) - 1
        end = self.edges[i] if i >= 0 and self.edges[i] > a else limit
        return min(max(end, b), self.shape[0])

    def nonfinite(self) -> int:
        """NaN/Inf count over the whole tensor (only asked for on the error path)."""
        step = max(1, self.worker.chunk_numel // max(self.shape[1], 1))
        return sum(nonfinite_count(self.rows(a, min(a + step, self.shape[0])))
                   for a in range(0, self.shape[0], step))  # fmt: skip


@dataclass
class _Out:
    tensors: list[dict] = field(default_factory=list)
    consistency: list[dict] = field(default_factory=list)
    pieces: dict[str, list[pa.Table]] = field(default_factory=dict)
    #: table -> (run, tensor, axis, values, expert) per profile, made into one table per unit
    profiles: dict[str, list[tuple]] = field(default_factory=dict)
    n_bytes: int = 0

    def add(self, table: str, data: pa.Table) -> None:
        self.pieces.setdefault(table, []).append(data)

    def profile(self, table: str, run: str | None, spec: TensorSpec, axis: str, values) -> None:
        self.profiles.setdefault(table, []).append((run, spec.name, axis, values, spec.expert))


def _repeated(values: list[str], counts: np.ndarray) -> pa.Array:
    """values[i] repeated counts[i] times: a dictionary-encoded string column (no string per
    row is built; ``ResultsDir.write_table`` writes the codes as they are)."""
    uniq = list(dict.fromkeys(values))
    code = {v: i for i, v in enumerate(uniq)}
    idx = np.repeat(np.array([code[v] for v in values], dtype=np.int32), counts)
    return pa.DictionaryArray.from_arrays(idx, pa.array(uniq, pa.string()))


def _profiles_table(unit: Unit, pieces: list[tuple], schema: pa.Schema) -> pa.Table:
    """One unit's profiles (row and column ratios, or consensus) as one table."""
    counts = np.array([len(p[3]) for p in pieces], dtype=np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    one = np.array([total])
    cols = {"scan_id": _repeated([unit.scan_id], one), "group_name": _repeated([unit.group], one)}
    if "run" in schema.names:
        cols["run"] = _repeated([p[0] for p in pieces], counts)
    experts = np.array([-1 if p[4] is None else p[4] for p in pieces], dtype=np.int32)
    cols |= {
        "tensor": _repeated([p[1] for p in pieces], counts),
        "expert": pa.array(np.repeat(experts, counts), mask=np.repeat(experts < 0, counts)),
        "axis": _repeated([p[2] for p in pieces], counts),
        "idx": np.arange(total, dtype=np.int32) - np.repeat(starts.astype(np.int32), counts),
        schema.names[-1]: np.concatenate([np.asarray(p[3], dtype=np.float32) for p in pieces]),
    }  # fmt: skip
    coded = pa.schema([pa.field(f.name, cols[f.name].type, f.nullable) if pa.types.is_string(f.type)
                       else f for f in schema])  # fmt: skip
    return pa.table([cols[f.name] for f in schema], schema=coded)


def _map_row(unit: Unit, run: str, spec: TensorSpec, kind: str, pooled: torch.Tensor) -> dict:
    return {"scan_id": unit.scan_id, "group_name": unit.group, "run": run, "tensor": spec.name,
            "expert": spec.expert, "kind": kind, "map_rows": pooled.shape[0],
            "map_cols": pooled.shape[1],
            "values": pooled.cpu().numpy().astype(np.float32).ravel()}  # fmt: skip


def _maps_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """The unit's maps, column by column (the values as one list array, no Python floats)."""
    if not rows:
        return schema.empty_table()
    values = [r["values"] for r in rows]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    cols = {
        f.name: pa.array([r[f.name] for r in rows], f.type) for f in schema if f.name != "values"
    }
    cols["values"] = pa.ListArray.from_arrays(
        offsets, pa.array(np.concatenate(values), pa.float32())
    )
    return pa.table([cols[f.name] for f in schema], schema=schema)


def _block_scale(src: _Source, block: list | None) -> tuple[torch.Tensor, int, int]:
    """An FP8 copy's scales -> (scale per block [scale rows, scale cols] float64, block rows,
    block cols): from ``<name>_scale_inv`` or ``<name>_scale`` (one expert's slice of a fused
    one), with block sizes from ``block`` (the config's ``weight_block_size``) or from the
    shapes; no scale tensor: 1 (the stored values are the weights). Raises ValueError naming
    the scale tensor when its shape does not tile the weight."""
    rows, cols = src.stored_rows, src.shape[1]
    name = next((src.name + x for x in SCALE_SUFFIXES if src.name + x in src.ck.entries), None)
    if name is None:
        return torch.ones(1, 1, dtype=torch.float64), max(rows, 1), max(cols, 1)
    e = src.ck.entries[name]
    if e.dtype not in FLOAT_DTYPES:
        raise ValueError(f"checkpoint {src.ck.ref}, tensor {name}: scale dtype {e.dtype}")
    scale = src.ck.read(name).to(torch.float64)
    weight_dims = len(src.ck.entries[src.name].shape)
    if src.expert is not None and scale.dim() == weight_dims and scale.dim() >= 2:
        scale = scale[src.expert]  # a fused tensor's scales: one expert's
    scale = scale.reshape(1, 1) if scale.numel() == 1 else scale.reshape(scale.shape[0], -1)
    srows, scols = scale.shape
    br, bc = (int(block[0]), int(block[1])) if block else (-(-rows // srows), -(-cols // scols))
    if -(-rows // br) != srows or -(-cols // bc) != scols:
        br, bc = -(-rows // srows), -(-cols // scols)  # the config's blocks do not fit: shapes
    if -(-rows // br) != srows or -(-cols // bc) != scols:
        raise ValueError(
            f"checkpoint {src.ck.ref}, tensor {name}: scale shape "
            f"{list(e.shape)} does not tile the weight [{rows}, {cols}]"
        )
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"checkpoint {src.ck.ref}, tensor {name}: NaN/Inf scale")
    return scale, br, bc


def _dequantized(src: _Source, scale: tuple[torch.Tensor, int, int], a: int, b: int):
    """Rows [a, b) of an FP8 copy (a: a multiple of the block rows) as float64 values [b - a,
    cols]: each FP8 value times the scale of its block."""
    s, br, bc = scale
    w = src.stored(a, b, ("value", src.slot)).to(torch.float64)
    s = s[a // br : -(-b // br)].repeat_interleave(br, 0)[: b - a]
    return w * s.repeat_interleave(bc, 1)[:, : w.shape[1]]


def _map_large_allocations() -> None:
    """Have glibc map allocations of MMAP_THRESHOLD bytes or more on their own, so that freed
    tensors go back to the system (elsewhere: nothing to do)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


def _will_need(cks: list[Checkpoint], names: list[str]) -> None:
    """Ask for every copy of ``names``, tensor by tensor, to be read into the page cache."""
    for name in names:
        for ck in cks:
            if name in ck.entries:
                try:
                    ck.will_need(name)
                except (OSError, CheckpointError):
                    return  # only advice: a real read reports the problem


class ScanWorker:
    """Scans work units of any group; keeps opened checkpoint headers between units."""

    def __init__(self, out: str, device: str | None = None, threads: int | None = None,
                 io_threads: int = IO_THREADS):  # fmt: skip
        self.results = ResultsDir(out)
        _map_large_allocations()
        # the base's and every run's copy of a tensor are read side by side (readinto and the
        # numba kernels release the GIL, so reads also overlap the statistics)
        self.io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="rlvr-read")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads:
            torch.set_num_threads(threads)
        self._open: dict[str, Checkpoint] = {}
        self._bufs: dict[tuple[str, int], torch.Tensor] = {}
        self._copies: dict[tuple[str, int], torch.cuda.Event] = {}  # pinned buffer -> its copy
        self.chunk_numel = CHUNK_NUMEL if self.device.type == "cpu" else GPU_CHUNK_NUMEL
        # on a CPU with the numba kernels, one fused pass takes the base and every run at once
        self.fused = kernels.enabled(self.device)
        self._arena = torch.empty(0, dtype=torch.int16)  # the fused pass's copies, slot by slot
        self._slot_numel = 0
        kernels.warm(self.device)  # load the compiled kernels now, not in the first unit
        if self.device.type == "cuda":  # create the CUDA context now too (~1 s)
            torch.zeros(1, device=self.device)
        self.cache = BaseCache(self.results)
        self.gate = PrecisionGate()  # runs given an fp32 master: the precision_gate table

    def checkpoint(self, ref: str) -> Checkpoint:
        if ref not in self._open:
            self._open[ref] = open_checkpoint(ref, fingerprint=False)
        return self._open[ref]

    def ping(self) -> str:
        return str(self.device)

    def run_unit(self, unit: Unit) -> dict:
        """Scan every tensor of ``unit``, write its parts, mark it done; -> a small report."""
        t0, started, c0 = time.perf_counter(), time.time(), time.process_time()
        base = self.checkpoint(unit.base_ref)
        runs = [self.checkpoint(r.ref) for r in unit.runs]
        for ref in set(self._open) - {unit.base_ref, *(r.ref for r in unit.runs)}:
            self._open.pop(ref).close()  # another group's: its open files would pile up
        out = _Out()
        # files on disk: have the kernel read the unit's tensors ahead, in order, meanwhile
        self.io.submit(_will_need, [base, *runs], [t.name for t in unit.tensors])
        for spec in unit.tensors:
            self._scan_tensor(unit, spec, base, runs, out)
            if (gate := self.gate.table(unit, spec, base, runs)) is not None:
                out.add("precision_gate", gate)
        part = f"{unit.scan_id}-{unit.index:05d}"
        tables = {}
        for table, schema in TABLES.items():
            if table == "tensors":
                data = pa.Table.from_pylist(out.tensors, schema=schema)
            elif table == "consistency":
                data = pa.Table.from_pylist(out.consistency, schema=schema)
            elif table in out.profiles:
                data = _profiles_table(unit, out.profiles[table], schema)
            elif table == "maps":
                data = _maps_table([r for t in out.pieces.get("maps", []) for r in t], schema)
            else:
                pieces = [p.select(schema.names).cast(schema) for p in out.pieces.get(table, [])]
                data = pa.concat_tables(pieces) if pieces else schema.empty_table()
            tables[table] = data
        # side by side (Parquet encoding releases the GIL); all written before the marker
        list(self.io.map(lambda kv: self.results.write_table(kv[0], part, kv[1]), tables.items()))
        statuses: dict[str, int] = {}
        for row in out.tensors:
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        report = {
            "scan_id": unit.scan_id, "unit": unit.index, "group": unit.group,
            "n_tensors": len(unit.tensors), "n_bytes": out.n_bytes, "statuses": statuses,
            "started": started, "seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 3), "device": str(self.device),
            "skipped": [f"{r['run']}/{r['tensor']}: {r['status']}: {r['message']}"
                        for r in out.tensors if r["status"] not in COMPARED][:50],
        }  # fmt: skip
        self.results.mark_unit_done(unit.scan_id, unit.index, report)
        return report

    # -- one tensor ---------------------------------------------------------------------------

    def _row(self, unit: Unit, spec: TensorSpec, run: RunSpec, **kw) -> dict:
        row = {"scan_id": unit.scan_id, "group_name": unit.group, "run": run.name,
               **run.labels(), "family": unit.family, "tensor": spec.name, "expert": spec.expert,
               "layer": spec.layer,
               "depth": spec.depth, "role": spec.role, "geometry_status": None}  # fmt: skip
        rname = spec.run_tensor(unit.runs.index(run))
        ck = self._open.get(run.ref)
        e1 = ck.entries.get(rname) if ck is not None else None
        row |= {
            "tower": spec.tower,
            "base_tensor": spec.base_tensor,
            "run_tensor": rname if rname != spec.name else None,
            "run_numel": e1.numel if e1 is not None else None,
        }
        row.update(kw)
        return row

    def _skip(self, unit, spec, run, status, message, out, **kw) -> None:
        out.tensors.append(self._row(unit, spec, run, status=status, message=message, **kw))

    def buffer(self, key, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` for ``key`` (("full", slot) or ("chunk", slot,
        0 | 1); slot 0: the base, i + 1: run i), reused from tensor to tensor: no page faults,
        and at most (runs + 1) x the largest tensor read whole (+ (runs + 1) x 2 windows)
        stays allocated.
        On a GPU it is pinned, and handed out only once its last copy to the device is done."""
        if (event := self._copies.pop(key, None)) is not None:
            event.synchronize()
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            self._bufs[key] = buf = None  # free the old one before allocating
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._bufs[key] = buf
        return buf

    def layout(self, slots: int, numel: int) -> torch.Tensor:
        """The fused pass's buffer, cut into ``slots`` slots of ``numel`` int16 elements (slot
        0: the base, i + 1: run i); grown, never shrunk, so that a worker's memory stays at
        (runs + 1) x its largest tensor read whole (or window)."""
        if self._arena.numel() < slots * numel:
            self._arena = torch.empty(0, dtype=torch.int16)  # free the old one first
            self._arena = torch.empty(slots * numel, dtype=torch.int16)
        self._slot_numel = numel
        return self._arena

    def slot(self, k: int) -> torch.Tensor:
        """Slot k of the fused pass's buffer (int16, flat)."""
        return self._arena[k * self._slot_numel : (k + 1) * self._slot_numel]

    def copied(self, key) -> None:
        """Buffer ``key`` was just copied to the device, asynchronously: remember when it ends."""
        if self.device.type == "cuda":
            self._copies[key] = event = torch.cuda.Event()
            event.record()

    def _scan_tensor(self, unit: Unit, spec: TensorSpec, base: Checkpoint,
                     runs: list[Checkpoint], out: _Out) -> None:  # fmt: skip
        name = spec.name
        e0 = base.entries.get(spec.base_tensor or name)
        if e0 is None:
            for i, (r, ck) in enumerate(zip(unit.runs, runs, strict=True)):
                if spec.run_tensor(i) in ck.entries:
                    self._skip(unit, spec, r, "missing_in_base",
                               f"tensor {name} is in run {r.name} but not in the base", out)  # fmt: skip
            return
        if e0.dtype not in COMPARABLE_DTYPES:
            for r in unit.runs:
                self._skip(unit, spec, r, "unsupported_dtype", f"base dtype {e0.dtype}", out)
            return
        if e0.numel == 0:  # no row or column is allocated for it (a [2^40, 0] shape is valid)
            for r in unit.runs:
                msg = f"checkpoint {unit.base_ref}, tensor {name}: shape {list(e0.shape)} is empty"
                self._skip(unit, spec, r, "empty", msg, out, numel=0, dtype_base=e0.dtype)
            return
        shape = piece_shape(e0.shape, spec.piece)
        _, rows0, cols0 = piece_layout(e0.shape, spec.piece)
        # the fused pass counts a row in int32 lanes: rows of more than MAX_COLS columns (no weight
        # matrix has them) take the torch path
        fused = self.fused and cols0 <= MAX_COLS
        if fused:  # every tensor not read whole for the SVD is read window by window
            stream = skip_reason(unit.params, spec.role, shape) is not None
        else:
            stream = streams(unit.params, spec.role, shape, rows0 * cols0 * DTYPES[e0.dtype][0] // 8)
        src0 = _Source(self, base, spec.base_tensor or name, 0, stream, fused=fused, expert=spec.piece)
        compared = self._load_runs(unit, spec, base, runs, stream, out, fused)
        sources = [src0, *(c.src for c in compared)]
        if fused:
            cols = src0.shape[1]
            numel = (max(s.stored_rows for s in sources) * cols if not stream
                     else max(1, FUSED_WINDOW_NUMEL // max(cols, 1)) * cols)  # fmt: skip
            self.layout(len(unit.runs) + 1, numel)
        failed = {}  # the copies are read side by side; a failed read skips its run (or all)
        loads = [self.io.submit(s.load) if not s.stream else None for s in sources]
        for src, f in zip(sources, loads, strict=True):
            try:
                out.n_bytes += f.result() if f is not None else 0
            except CheckpointError as e:
                failed[id(src)] = str(e)
        if id(src0) in failed:
            for r in unit.runs:
                self._skip(unit, spec, r, "read_error", failed[id(src0)], out)
            return
        for c in [c for c in compared if id(c.src) in failed]:
            self._skip(unit, spec, unit.runs[c.run], "read_error", failed[id(c.src)], out)
            compared.remove(c)
        run_pass = self._group_pass if fused else self._chunk_pass
        # a run found to hold NaN/Inf, or whose file fails under the scan, is dropped and the
        # passes are redone (nothing is emitted before they all succeed)
        while True:
            try:
                stats, cons = run_pass(unit, spec, src0, [c for c in compared if c.status == "ok"], out)  # fmt: skip
                for c in compared:
                    if c.status == "vocab_resized":
                        stats.update(run_pass(unit, spec, src0.head(c.src.shape[0]), [c], out,
                                              consistency=False)[0])  # fmt: skip
                break
            except (_NonFinite, _ReadFailed) as err:
                base_bad = err.src.slot == 0  # the base (or its head, in a resized pass)
                c = None if base_bad else next(c for c in compared if c.src.slot == err.src.slot)
                if isinstance(err, _ReadFailed):
                    status, msg = "read_error", err.message
                elif base_bad:
                    status, msg = "nonfinite", (f"checkpoint {unit.base_ref}, tensor {src0.name}: "
                                                f"{src0.nonfinite()} NaN/Inf values in the base")  # fmt: skip
                else:
                    status, msg = "nonfinite", (f"checkpoint {unit.runs[c.run].ref}, tensor {c.src.name}: "
                                                f"{c.src.nonfinite()} NaN/Inf values")  # fmt: skip
                for bad in compared if base_bad else [c]:
                    self._skip(unit, spec, unit.runs[bad.run], status, msg, out)
                if base_bad:
                    return
                compared.remove(c)
        if cons is not None:
            self._emit_consistency(unit, spec, *cons, out)
        geo = self._geometry(unit, spec, shape, src0, compared, out)
        values = self._fp8_values(src0, compared) if src0.dtype in FP8_DTYPES else {}
        for c in compared:
            self._emit_run(
                unit, spec, src0, c, stats[c.run], geo.get(c.run, {}), out, values.get(c.run)
            )

    def _geometry(self, unit: Unit, spec: TensorSpec, shape, src0: _Source, compared, out) -> dict:
        """{run index: geometry columns}; the base is decomposed (or fetched) once for all."""
        reason = skip_reason(unit.params, spec.role, tuple(shape))
        if reason is None and src0.dtype in FP8_DTYPES:
            reason = "skipped_fp8"  # the SVD of dequantized FP8 weights is not implemented
        if reason is not None:
            return {c.run: {"geometry_status": reason} for c in compared}
        cols: dict[int, dict] = {}
        base = None
        for c in compared:
            if c.status != "ok":
                cols[c.run] = {"geometry_status": f"skipped_{c.status}"}
                continue
            try:
                if base is None:
                    base = self.cache.get(unit.base_fingerprint, src0.full, unit.params)
                mask = update_mask(src0.full, c.src.full)
                g = run_geometry(base, c.src.full.view(torch.bfloat16), mask)
                w0, w1 = src0.full.view(torch.bfloat16), c.src.full.view(torch.bfloat16)
                upd = update_geometry(base, w0, w1)
            except (ValueError, RuntimeError) as e:  # e.g. a degenerate matrix: keep the row
                cols[c.run] = {"geometry_status": f"error: {str(e).splitlines()[0][:200]}"}
                continue
            cols[c.run] = row_columns(g, upd)
            run_name, full = unit.runs[c.run].name, unit.params.full_spectrum
            rows = spectra_rows(unit.scan_id, unit.group, run_name, spec.name, base, g, full)
            out.add(
                "spectra",
                rows.append_column("expert", pa.array([spec.expert] * rows.num_rows, pa.int32())),
            )
        return cols

    def _fp8_values(self, src0: _Source, compared: list[_Compared]) -> dict:
        """An FP8 tensor's value statistics, on values dequantized with each copy's own block
        scales (W = FP8 value x scale of its block; float64 on the CPU, where the products
        are exact), a chunk of
        whole scale blocks at a time -> {run index: (sum of squared updates, base sum of
        squares over the rows compared, max |update|, None)}, or (None, 0, None, why) for a
        run whose scales cannot be used."""
        quant = (src0.ck.config or {}).get("quantization_config") or {}
        block = quant.get("weight_block_size") if isinstance(quant, dict) else None
        scales, out = {}, {}
        for c in [None, *compared]:
            src = src0 if c is None else c.src
            try:
                scales[src.slot] = _block_scale(src, block)
            except (ValueError, CheckpointError) as e:
                if c is None:
                    return {c.run: (None, 0, None, str(e)) for c in compared}
                out[c.run] = (None, 0, None, str(e))
        todo = [c for c in compared if c.run not in out]
        acc = {c.run: [0.0, 0.0, 0.0] for c in todo}  # update sumsq, base sumsq, max |update|
        rows, cols = src0.shape
        step = max(1, (1 << 20) // max(cols, 1))
        blocks = math.lcm(scales[0][1], *(scales[c.src.slot][1] for c in todo))
        step = -(-step // blocks) * blocks  # whole blocks of every copy's scales
        for a in range(0, rows, step):
            w0 = _dequantized(src0, scales[0], a, min(a + step, rows))
            for c in todo:
                b = min(a + step, c.src.shape[0])
                if b <= a:
                    continue
                d = _dequantized(c.src, scales[c.src.slot], a, b) - w0[: b - a]
                s = acc[c.run]
                s[0] += float(torch.dot(d.reshape(-1), d.reshape(-1)))
                s[1] += float(w0[: b - a].square().sum())
                s[2] = max(s[2], float(d.abs().max())) if d.numel() else s[2]
        return out | {run: (s[0], s[1], s[2], None) for run, s in acc.items()}

    def _load_runs(self, unit, spec, base, runs, stream: bool, out, fused: bool = False) -> list[_Compared]:  # fmt: skip
        """The runs' sources of a tensor (nothing read yet); rows for runs that cannot be."""
        e0 = base.entries[spec.base_tensor or spec.name]
        compared = []
        for i, (r, ck) in enumerate(zip(unit.runs, runs, strict=True)):
            rname = spec.run_tensor(i)  # the run's tied embedding may stand in for its head
            e1 = ck.entries.get(rname)
            where = f"checkpoint {r.ref}, tensor {rname}"
            if e1 is None:
                self._skip(unit, spec, r, "missing_in_run", f"{where}: not in the run", out)
                continue
            if e1.dtype not in COMPARABLE_DTYPES:
                self._skip(unit, spec, r, "unsupported_dtype", f"{where}: dtype {e1.dtype}", out)
                continue
            if e1.dtype != e0.dtype and (e1.dtype in FP8_DTYPES or e0.dtype in FP8_DTYPES):
                self._skip(
                    unit,
                    spec,
                    r,
                    "dtype_mismatch",
                    f"{where}: dtype {e1.dtype} vs base {e0.dtype}",
                    out,
                )
                continue
            status, message, limit = "ok", None, None
            if e1.shape != e0.shape:
                if (
                    spec.piece is None
                    and len(e1.shape) == len(e0.shape) >= 2
                    and e1.shape[1:] == e0.shape[1:]
                ):
                    status, limit = "vocab_resized", min(e0.shape[0], e1.shape[0])
                    message = (f"{where}: shape {list(e1.shape)} vs base {list(e0.shape)}; "
                               f"compared the common {limit} rows")  # fmt: skip
                else:
                    self._skip(unit, spec, r, "shape_mismatch",
                               f"{where}: shape {list(e1.shape)} vs base {list(e0.shape)}", out)  # fmt: skip
                    continue
            src = _Source(self, ck, rname, i + 1, stream, limit, fused, spec.piece)
            compared.append(_Compared(i, src, status, message))
        return compared

    def _chunk_pass(self, unit: Unit, spec: TensorSpec, src0: _Source,
                    comp: list[_Compared], out: _Out, consistency: bool = True) -> tuple[dict, tuple | None]:  # fmt: skip
        """Row-chunked pass over base + runs -> ({run index: (MaskStats, base sumsq)}, the
        consistency to emit (numel, members, ConsistencyStats, is_matrix) or None); raises
        _NonFinite for the base or the first run holding NaN/Inf, _ReadFailed for a copy that
        cannot be read (the caller drops that run and redoes the passes)."""
        if not comp:
            return {}, None
        rows, cols = src0.shape
        is_matrix = spec.nbytes > 0 and rows > 1
        map_size = unit.params.map_size if is_matrix else None
        accs = [MaskAccumulator(rows, cols, ULP_BIN_EDGES, self.device, map_size) for _ in comp]
        step = max(1, self.chunk_numel // max(cols, 1))  # rows per chunk
        edges = [*range(0, rows, step), rows]
        members = [k for k, c in enumerate(comp) if unit.runs[c.run].consistency]
        cons = None
        if consistency and len(members) >= 2:
            cons = ConsistencyAccumulator(len(members), rows, cols, self.device)
        bit = {k: i for i, k in enumerate(members)} if cons is not None else {}
        base_ss = base_nf = 0
        sources = [src0, *(c.src for c in comp)]
        for src in sources:  # a window may share its buffers with another pass's (head())
            src.start(edges)
        try:
            for a, b in zip(edges[:-1], edges[1:], strict=True):
                c0, *c1 = self._rows(sources, a, b, out)
                ss, nf = base_stats(c0)
                base_ss, base_nf = base_ss + ss, base_nf + nf
                planes = cons.planes(b - a) if cons is not None else None
                for k, (acc, x) in enumerate(zip(accs, c1, strict=True)):
                    acc.add(c0, x, planes, bit.get(k, -1))
                if cons is not None:
                    cons.add(planes)
                if self.device.type == "cpu" and (base_nf or any(m.nonfinite() for m in accs)):
                    break  # stop early where checking is free; a GPU checks once, at the end
        finally:
            for src in sources:  # no read may still be writing into a buffer after the pass
                src.stop()
        if int(base_nf):
            raise _NonFinite(src0)
        for acc, c in zip(accs, comp, strict=True):
            if acc.nonfinite():
                raise _NonFinite(c.src)
        base_ss = float(base_ss)
        if cons is not None:
            mem = [accs[k] for k in members]
            pooled = ((sum(m.pool.sums() for m in mem), mem[0].pool.blocks()) if map_size
                      else (None, None))  # fmt: skip
            cs = cons.finish(
                sum(m.row_counts for m in mem), sum(m.col_counts for m in mem), *pooled
            )
            cons = (rows * cols, [comp[k] for k in members], cs, is_matrix)
        return {c.run: (acc.finish(), base_ss) for acc, c in zip(accs, comp, strict=True)}, cons

    def _group_pass(self, unit: Unit, spec: TensorSpec, src0: _Source,
                    comp: list[_Compared], out: _Out, consistency: bool = True) -> tuple[dict, tuple | None]:  # fmt: skip
        """The fused CPU pass: the base and every run in one kernel pass per window of rows
        (read straight into the worker's buffer, in this thread) or over the tensors read
        whole -> what ``_chunk_pass`` returns; raises _NonFinite and _ReadFailed like it."""
        if not comp:
            return {}, None
        rows, cols = src0.shape
        is_matrix = spec.nbytes > 0 and rows > 1
        members = [k for k, c in enumerate(comp) if unit.runs[c.run].consistency]
        if not consistency or len(members) < 2:
            members = []
        acc = GroupAccumulator(rows, cols, len(comp), members, ULP_BIN_EDGES,
                               unit.params.map_size if is_matrix else None)  # fmt: skip
        sources = [src0, *(c.src for c in comp)]
        flat = self._arena.numpy()
        base = np.array([s.slot * self._slot_numel for s in sources], dtype=np.int64)
        if src0.full is not None:  # read whole (for the SVD): one pass over all of it
            acc.add(flat, base, rows)
        else:
            step = max(1, FUSED_WINDOW_NUMEL // max(cols, 1))
            reads = [s.window_reader(self.slot(s.slot)) for s in sources]
            for a in range(0, rows, step):
                b = min(a + step, rows)
                for src, read in zip(sources, reads, strict=True):
                    out.n_bytes += _reading(src, read, a, b)
                acc.add(flat, base, b - a)
                if acc.iacc[:, 2].any():
                    break  # stop early: the pass is redone without the copy holding NaN/Inf
        if acc.nonfinite(0):
            raise _NonFinite(src0)
        for k, c in enumerate(comp):
            if acc.nonfinite(k + 1):
                raise _NonFinite(c.src)
        acc.finish()
        cs = acc.consistency()
        cons = (rows * cols, [comp[k] for k in members], cs, is_matrix) if cs is not None else None
        return {c.run: (acc.mask_stats(k), acc.base_sumsq) for k, c in enumerate(comp)}, cons

    def _rows(self, sources: list[_Source], a: int, b: int, out: _Out) -> list[torch.Tensor]:
        """Rows [a, b) of every source; streamed ones are read side by side."""
        need = [s for s in sources if not s._in_memory(a, b)]
        if need:  # a new window for each streamed copy: the prefetched one, else read now
            out.n_bytes += sum(s.needs_read(a, b) for s in need)
            for s, fetched in [(s, s.fetch(a, b, self.io)) for s in need]:
                _reading(s, s.install, fetched, self.io)
        return [_reading(s, s.rows, a, b) for s in sources]

    def _emit_run(self, unit, spec, src0: _Source, c: _Compared, stats, geo, out, values=None):
        """One run's tensors row (and profiles, map). ``values``: an FP8 tensor's value
        statistics from ``_fp8_values`` (the mask pass's are of patterns, not values)."""
        ms, base_ss = stats
        ms: MaskStats
        r = unit.runs[c.run]
        update_ss, max_abs, message = ms.update_sumsq, ms.max_abs_update, c.message
        if src0.dtype in FP8_DTYPES:
            update_ss, base_ss, max_abs, why = values or (None, 0, None, "no values")
            message = "; ".join(m for m in (message, why) if m) or None
        rows, cols = c.src.shape
        is_matrix = rows > 1
        row = self._row(
            unit, spec, r, rows=rows, cols=cols, numel=ms.numel, dtype_base=src0.dtype,
            dtype_run=c.src.dtype, rounded_to_bf16=src0.rounded or c.src.rounded,
            n_changed=ms.n_changed, update_density=ms.update_density,
            stripe_row=gini_counts(ms.row_counts) if is_matrix else None,
            stripe_col=gini_counts(ms.col_counts) if is_matrix else None,
            ulp1_share=ms.ulp1_share, ulp_hist=ms.ulp_hist, ulp_max=ms.ulp_max,
            rel_frob=(update_ss / base_ss) ** 0.5 if base_ss and update_ss is not None else None,
            max_abs_update=max_abs, status=c.status, message=message, **geo,
        )  # fmt: skip
        out.tensors.append(row)
        if is_matrix:
            out.profile("profiles", r.name, spec, "row", ms.row_ratio.numpy())
            out.profile("profiles", r.name, spec, "col", ms.col_ratio.numpy())
            out.add("maps", [_map_row(unit, r.name, spec, "mask", ms.pooled)])

    def _emit_consistency(self, unit, spec, numel, members, cs: ConsistencyStats, is_matrix, out):
        out.consistency.append({
            "scan_id": unit.scan_id, "group_name": unit.group, "tensor": spec.name,
            "expert": spec.expert, "family": unit.family, "layer": spec.layer,
            "depth": spec.depth, "role": spec.role, "tower": spec.tower,
            "numel": numel, "n_runs": cs.n_runs, "runs": [unit.runs[c.run].name for c in members],
            "mean_jaccard": cs.mean_jaccard, "jaccard_baseline": cs.jaccard_baseline,
            "consensus_counts": cs.consensus_counts, "status": "ok",
        })  # fmt: skip
        if is_matrix:
            out.profile("consensus_profiles", None, spec, "row", cs.row_consensus.cpu().numpy())
            out.profile("consensus_profiles", None, spec, "col", cs.col_consensus.cpu().numpy())
            out.add("maps", [_map_row(unit, "*", spec, "consensus", cs.pooled)])
