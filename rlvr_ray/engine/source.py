"""One checkpoint's copy of one tensor, read as int16 bit patterns, row range by row range.

A ``Source`` knows a `Checkpoint`, the tensor's name and a `Buffers` provider, and reads only
through the checkpoint's methods (``read_exact``, ``pread``, ``read``, ``entries``), so it
reads whatever the checkpoint can read. A copy is either read whole into a reused buffer
(tensors that get geometry, and small ones) or streamed: a window of rows at a time, so a huge
tensor (an embedding) costs (runs + 1) x 2 windows of memory instead of (runs + 1) tensors.
Windows end on chunk edges, and while the chunks of one window are computed on, the next one is
read into the other of two buffers, so reading overlaps the statistics.

Patterns are bf16's, or an FP8 copy's own 8-bit ones (``fp8_bits``); any other float dtype is
rounded to bf16 first. A fused expert tensor [experts, rows, cols] is read one expert's matrix
at a time: rows ``expert * rows`` onward of the tensor viewed as [experts * rows, cols].

For the fused CPU pass a bf16 copy is read straight into its numpy slot of the arena, so it
takes no torch; torch is imported where its tensors are built: another storage dtype's
conversion (torch's rounding defines the bf16 patterns), and the torch pass's buffers.
"""

from __future__ import annotations

import bisect
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from rlvr_ray.engine.buffers import Buffers, Device
from rlvr_ray.engine.memory import STREAM_WINDOW_NUMEL
from rlvr_ray.io.checkpoint import FLOAT_DTYPES, Checkpoint, CheckpointError, torch_dtype
from rlvr_ray.stats import kernels

if TYPE_CHECKING:
    import torch

#: FP8 storage dtypes: compared in their own 8-bit patterns, never rounded to bf16
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
COMPARABLE_DTYPES = (*FLOAT_DTYPES, *FP8_DTYPES)


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


class ReadFailed(Exception):
    """Rows of ``src`` could not be read mid-pass (the file changed or failed under the scan)."""

    def __init__(self, src: Source, message: str):
        super().__init__(message)
        self.src, self.message = src, message


def reading(src: Source, read, *args):
    """read(*args), a failure to read becoming ReadFailed(src)."""
    try:
        return read(*args)
    except CheckpointError as e:
        raise ReadFailed(src, str(e)) from None


class Source:
    """Tensor ``name`` of ``ck`` (expert ``expert``'s matrix of it, for a fused expert tensor)
    as int16 patterns [rows, cols], cut to its first ``limit`` rows if given. ``slot``: which
    copy it is (0: the base, i + 1: run i), naming its buffers; ``fused``: read for the fused
    CPU pass, into the arena's slot."""

    def __init__(
        self,
        ck: Checkpoint,
        name: str,
        slot: int,
        stream: bool,
        buffers: Buffers,
        limit: int | None = None,
        fused: bool = False,
        expert: int | None = None,
    ):
        entry = ck.entries[name]
        self.ck, self.name, self.slot, self.stream, self.buffers = ck, name, slot, stream, buffers
        self.fused, self.expert = fused, expert
        self.row0, rows, cols = piece_layout(entry.shape, expert)
        self._rows = rows
        self.shape = (min(rows, limit) if limit is not None else rows, cols)
        self.dtype = entry.dtype  # storage dtype: BF16 is read as it is, anything else converted
        self.converted = entry.dtype != "BF16"
        self.rounded = entry.dtype not in ("BF16", *FP8_DTYPES)  # FP8 keeps its own patterns
        self.full: torch.Tensor | np.ndarray | None = None  # numpy: in the fused pass's arena
        self.edges: list[int] = []  # the pass's chunk edges: windows end on them
        self.window: tuple[int, int, torch.Tensor, int] | None = None  # start, end, rows, buffer
        self.pending: tuple[int, int, Future, int] | None = None  # the next window, being read

    @property
    def entry(self):
        return self.ck.entries[self.name]

    @property
    def stored_rows(self) -> int:
        """Rows in the file (more than ``shape[0]`` when a resized vocabulary is cut)."""
        return self._rows

    def stored(
        self, a: int, b: int, key: tuple, device: Device | torch.device | None = None
    ) -> torch.Tensor:
        """Rows [a, b) in the stored dtype, [b - a, cols], read into buffer ``key`` (then moved
        to ``device``, if a GPU)."""
        entry = self.entry
        dtype, size = torch_dtype(entry.dtype)
        n = self.nbytes(a, b)
        buf = self.buffers.buffer(key, n)[:n]
        if n:
            start = (self.row0 + a) * self.shape[1] * size
            self.ck.read_exact(entry, start, memoryview(buf.numpy()))
        t = buf.view(dtype).reshape(b - a, self.shape[1])
        if device is not None and device.type == "cuda":
            t = t.to(device, non_blocking=True)
            self.buffers.copied(key)
        return t

    def read_into(self, a: int, b: int, dst: np.ndarray) -> int:
        """Rows [a, b) as int16 patterns into the flat int16 ``dst`` (any thread; the fused CPU
        pass) -> bytes read. A copy not stored as bf16 is read aside and converted into it."""
        n = (b - a) * self.shape[1]
        if not self.converted:
            start = (self.row0 + a) * 2 * self.shape[1]
            self.ck.read_exact(self.entry, start, memoryview(dst[:n]).cast("B"))
            return 2 * n
        from rlvr_ray.stats.masks import compare_bits

        raw = self.stored(a, b, ("raw", self.slot))
        dst[:n] = compare_bits(raw)[0].reshape(-1).numpy()
        return self.nbytes(a, b)

    def window_reader(self, dst: np.ndarray):
        """-> read(a, b): rows [a, b) into the start of ``dst`` (int16, flat) -> bytes read.
        The fused pass reads every window of every copy through it, so a bf16 copy's window is
        one positional read; anything unusual (a short read) takes ``read_into``, which says
        what went wrong."""
        if self.converted:
            return lambda a, b: self.read_into(a, b, dst)
        entry, row_bytes = self.entry, 2 * self.shape[1]
        start = self.row0 * row_bytes
        view = memoryview(dst).cast("B")

        def read(a: int, b: int) -> int:
            n = (b - a) * row_bytes
            if self.ck.pread(entry, start + a * row_bytes, view[:n]) == n:
                return n
            return self.read_into(a, b, dst)

        return read

    def load(self) -> int:
        """Read the whole tensor unless it is streamed (any thread) -> bytes read."""
        if self.stream:
            return 0
        if self.fused:  # into the copy's slot of the arena
            rows = self.stored_rows
            dst = self.buffers.slot(self.slot)
            n = self.read_into(0, rows, dst)
            self.full = dst[: rows * self.shape[1]].reshape(rows, self.shape[1])[: self.shape[0]]
            return n
        from rlvr_ray.stats.masks import compare_bits

        raw = self.stored(0, self.stored_rows, ("full", self.slot), self.buffers.device)
        self.full = compare_bits(raw)[0][: self.shape[0]]
        return self.nbytes(0, self.stored_rows)

    def nbytes(self, a: int, b: int) -> int:
        """Bytes of rows [a, b) in the file."""
        entry = self.entry
        return (b - a) * self.shape[1] * (entry.nbytes // max(entry.numel, 1))

    def head(self, n: int) -> Source:
        """The first n rows (a resized vocabulary's common rows), sharing what was read."""
        other = object.__new__(Source)
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
        """Rows [a, end) into buffer ``buf`` (0 or 1), on the buffers' device (any thread)."""
        from rlvr_ray.stats.masks import compare_bits

        data = self.stored(a, end, ("chunk", self.slot, buf), self.buffers.device)
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
            next_edge = self.edges[i] if i < len(self.edges) else self.shape[0]
            next_end = self._window_end(end, next_edge)
            future = pool.submit(self._read, end, next_end, 1 - buf)
            self.pending = (end, next_end, future, 1 - buf)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as int16 patterns (a window not in memory is read here, synchronously)."""
        if self.full is not None:
            return self.full[a:b]
        if not self.in_memory(a, b):
            self.stop()
            end = self._window_end(a, b)
            buf = 1 - self.window[3] if self.window is not None else 0
            self.window = (a, end, self._read(a, end, buf), buf)
        window_start, _, data, _ = self.window
        return data[a - window_start : b - window_start]

    def needs_read(self, a: int, b: int) -> int:
        """Bytes that serving rows [a, b) reads from the file (0: in memory already)."""
        return 0 if self.in_memory(a, b) else self.nbytes(a, self._window_end(a, b))

    def in_memory(self, a: int, b: int) -> bool:
        """Whether rows [a, b) are served without a read."""
        w = self.window
        return self.full is not None or (w is not None and w[0] <= a and b <= w[1])

    def _window_end(self, a: int, b: int) -> int:
        """End row of the window read to serve rows [a, b): the last chunk edge within
        STREAM_WINDOW_NUMEL elements of a (so the next window starts a chunk), and >= b."""
        limit = a + STREAM_WINDOW_NUMEL // max(self.shape[1], 1)
        i = bisect.bisect_right(self.edges, limit) - 1
        end = self.edges[i] if i >= 0 and self.edges[i] > a else limit
        return min(max(end, b), self.shape[0])

    def nonfinite(self, chunk_numel: int) -> int:
        """NaN/Inf count over the whole tensor, ``chunk_numel`` elements at a time (only asked
        for on the error path)."""
        rows, cols = self.shape
        if self.fused and self.full is None:  # streamed: read again through its arena slot
            dst = self.buffers.slot(self.slot)
            step = max(1, dst.size // max(cols, 1))
            count = 0
            for a in range(0, rows, step):
                b = min(a + step, rows)
                self.read_into(a, b, dst)
                count += int(kernels.count_nonfinite(dst[: (b - a) * cols]))
            return count
        if isinstance(self.full, np.ndarray):  # read whole into the arena
            return int(kernels.count_nonfinite(self.full.ravel()))
        from rlvr_ray.stats.masks import nonfinite_count

        step = max(1, chunk_numel // max(cols, 1))
        return sum(nonfinite_count(self.rows(a, min(a + step, rows))) for a in range(0, rows, step))
