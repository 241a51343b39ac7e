"""The scan worker: a plain class that scans one work unit and writes its Parquet parts.

It becomes a Ray actor only at the edge (``rlvr_ray.engine.driver``); tests call it directly.
For each tensor of the unit, ``rlvr_ray.engine.passes.measure`` reads the base's copy once and
every run's, and measures them; ``rlvr_ray.engine.tables`` makes the results rows. Either way
at most (runs + 1) x the tensor's bytes are resident, and scratch is a chunk, not a tensor. A
tensor that cannot be compared gets a row whose ``status`` says why (``rlvr_ray.io.schema``'s
``STATUSES``). Parts are written side by side, then the unit is marked done.

A CPU worker with the numba kernels (device "cpu") scans bf16 tensors without importing torch:
torch comes in with the first thing that needs it (geometry, FP8 values, another storage
dtype's conversion, a master's precision gate, the torch pass), and with device None (which
asks torch whether there is a GPU) or a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rlvr_ray.engine.buffers import Buffers, Device
from rlvr_ray.engine.gate import PrecisionGate
from rlvr_ray.engine.geometry import BaseCache
from rlvr_ray.engine.memory import CHUNK_NUMEL, GPU_CHUNK_NUMEL, MMAP_THRESHOLD
from rlvr_ray.engine.passes import PassContext, measure
from rlvr_ray.engine.plan import Unit
from rlvr_ray.engine.tables import UnitTables
from rlvr_ray.io.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from rlvr_ray.io.results import ResultsDir, open_results
from rlvr_ray.probes import settled
from rlvr_ray.sql.status import COMPARED
from rlvr_ray.stats import kernels

#: concurrent reads per worker: the base's and the runs' copies of a tensor
IO_THREADS = 8


def _map_large_allocations() -> None:
    """Have glibc map allocations of MMAP_THRESHOLD bytes or more on their own, so that freed
    tensors go back to the system (elsewhere: nothing to do). Setting it fixes glibc's trim
    threshold too, at 128 KiB unless set: every free at a heap's top then gave memory back and
    the next allocation faulted it in again (DuckDB's commit of a 1.5B run's atlas in the same
    process: 0.06 -> 0.095 s); it is set to twice the mapping threshold, as glibc's own rule
    would have it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * MMAP_THRESHOLD)  # -1: M_TRIM_THRESHOLD


def _will_need(cks: list[Checkpoint], names: list[str]) -> None:
    """Ask for every copy of ``names``, tensor by tensor, to be read into the page cache."""
    for name in names:
        for ck in cks:
            if name in ck.entries:
                try:
                    ck.will_need(name)
                except (OSError, CheckpointError):
                    return  # only advice: a real read reports the problem


def _device(device: str | None) -> Device:
    """The worker's device: ``device`` as torch spells it; None: a GPU when torch sees one."""
    if device is not None and str(device) == "cpu":
        return Device("cpu")
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Device(str(torch.device(device)))  # a name torch does not know fails here


class ScanWorker:
    """Scans work units of any group; keeps opened checkpoint headers between units."""

    def __init__(
        self,
        out: str | ResultsDir,
        device: str | None = None,
        threads: int | None = None,
        io_threads: int = IO_THREADS,
    ):
        self.results = open_results(out)  # the in-process pool's threads share one
        _map_large_allocations()
        # the base's and every run's copy of a tensor are read side by side (reads and the
        # numba kernels release the GIL, so reads also overlap the statistics)
        self.io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="rlvr-read")
        self.device = _device(device)
        self.threads = threads  # torch's threads, set once torch is imported
        self._open: dict[str, Checkpoint] = {}
        self.buffers = Buffers(self.device)
        self.chunk_numel = CHUNK_NUMEL if self.device.type == "cpu" else GPU_CHUNK_NUMEL
        # on a CPU with the numba kernels, one fused pass takes the base and every run at once
        self.fused = kernels.enabled(self.device)
        kernels.warm(self.device)  # load the compiled kernels now, not in the first unit
        self._torch_threads(need=not self.fused)
        if self.device.type == "cuda":  # create the CUDA context now too
            import torch

            torch.zeros(1, device=self.device)
        self.cache = BaseCache(self.results)
        #: table -> column -> the producers that set it, over every unit scanned
        self.produced: dict[str, dict[str, set[str]]] = {}
        self.gate = PrecisionGate()  # runs given an fp32 master: the precision_gate table
        settled()  # a scan's own process: its set-up is over (the garbage collector's hold)

    def _torch_threads(self, need: bool = False) -> None:
        """Give torch ``threads`` threads once it is imported (``need``: import it now)."""
        if self.threads and (need or "torch" in sys.modules):
            import torch

            torch.set_num_threads(self.threads)
            self.threads = None

    def checkpoint(self, ref: str) -> Checkpoint:
        if ref not in self._open:
            self._open[ref] = open_checkpoint(ref, fingerprint=False)
        return self._open[ref]

    def ping(self) -> str:
        return str(self.device)

    def run_unit(self, unit: Unit) -> dict:
        """Scan every tensor of ``unit``, write its parts, mark it done; -> a small report."""
        wall0, started, cpu0 = time.perf_counter(), time.time(), time.process_time()
        base = self.checkpoint(unit.base_ref)
        runs = [self.checkpoint(r.ref) for r in unit.runs]
        for ref in set(self._open) - {unit.base_ref, *(r.ref for r in unit.runs)}:
            self._open.pop(ref).close()  # another group's: its open files would pile up
        # files on disk: have the kernel read the unit's tensors ahead, in order, meanwhile
        self.io.submit(_will_need, [base, *runs], [t.name for t in unit.tensors])
        ctx = PassContext(
            self.device, self.chunk_numel, self.buffers, self.io, self.cache, self.fused
        )
        out = UnitTables(unit, runs)
        self._torch_threads(need=unit.params.geometry)  # the SVDs are torch's
        for spec in unit.tensors:
            self._torch_threads()
            out.add_tensor(spec, measure(ctx, unit, spec, base, runs))
            if (gate := self.gate.table(unit, spec, base, runs)) is not None:
                out.add_gate(gate)
        tables = out.build()
        part = f"{unit.scan_id}-{unit.index:05d}"
        # side by side (Parquet encoding releases the GIL); all written before the marker
        list(self.io.map(lambda kv: self.results.write_table(kv[0], part, kv[1]), tables.items()))
        for table, columns in out.produced.items():
            for col, producers in columns.items():
                self.produced.setdefault(table, {}).setdefault(col, set()).update(producers)
        rows = out.rows["tensors"]
        statuses: dict[str, int] = {}
        for row in rows:
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        skipped = [
            f"{r['run']}/{r['tensor']}: {r['status']}: {r['message']}"
            for r in rows
            if r["status"] not in COMPARED
        ]
        report = {
            "scan_id": unit.scan_id,
            "unit": unit.index,
            "group": unit.group,
            "n_tensors": len(unit.tensors),
            "n_bytes": ctx.n_bytes,
            "statuses": statuses,
            "started": started,
            "seconds": round(time.perf_counter() - wall0, 3),
            "cpu_seconds": round(time.process_time() - cpu0, 3),
            "device": str(self.device),
            "skipped": skipped[:50],
        }
        self.results.mark_unit_done(unit.scan_id, unit.index, report)
        return report
