"""The in-process executor: a scan's units run on threads of this process, without Ray.

A scan on one machine that is small (its checkpoints' files add up to at most
``LOCAL_MAX_BYTES``) spends more time starting Ray and its actors than scanning: a Qwen2.5-1.5B
pair is ~1 s of units against ~10 CPU-seconds of Ray services and actor imports. Such a scan
runs here instead: one :class:`~rlvr_ray.engine.worker.ScanWorker` per thread (reads and the
numba kernels release the GIL, so the threads scan side by side), taking units from the same
:class:`~rlvr_ray.engine.pool.UnitQueue` as the actors, largest first. A unit that raises is a
``unit_error`` failure and the others go on, as on actors; what a thread cannot survive (a
crash of the process) loses the scan's units in flight only: every finished unit is marked
done, so a rerun resumes.

:func:`choose` decides between this and Ray (``executor="auto"``); ``"ray"`` and ``"local"``
force one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rlvr_ray.engine.failures import DISK_FULL, Failure, one_line, unit_failure
from rlvr_ray.engine.pool import UnitQueue
from rlvr_ray.io.results import ResultsDir

EXECUTORS = ("auto", "ray", "local")
#: "auto" runs a scan in-process when its checkpoints' files add up to no more than this
LOCAL_MAX_BYTES = 16 << 30
#: how often the main thread wakes while waiting for the units (Ctrl-C is seen then)
JOIN_POLL_S = 0.2


def _ray_running_here() -> bool:
    """Whether this process already joined a Ray (a notebook's ``ray.init``, a Ray job)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (its device nodes)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl")


def local_bytes(refs: Sequence[str]) -> int | None:
    """Bytes of the files of the local checkpoints ``refs`` (a directory's safetensors files,
    or one file); None when any is remote (``hf://``, ``s3://``)."""
    total = 0
    for ref in set(refs):
        if "://" in ref:
            return None
        try:
            if os.path.isdir(ref):
                with os.scandir(ref) as it:
                    files = [e.path for e in it if e.name.endswith(".safetensors")]
            else:
                files = [ref]
        except OSError:
            continue  # the scan reports an unreadable checkpoint: nothing to count here
        for f in files:
            with contextlib.suppress(OSError):  # a broken link, a loop: the same
                total += os.path.getsize(f)
    return total


def choose(
    executor: str | None,
    refs: Sequence[str],
    address: str | None,
    gpus_per_worker: float | None,
) -> str:
    """ "ray" or "local" for a scan of the checkpoints ``refs``. ``executor``: "ray" or "local"
    forces it; "auto" (or None: ``$RLVR_RAY_EXECUTOR``, else "auto") runs in-process a scan
    that joins no cluster (no ``address``, no ``$RAY_ADDRESS``, no Ray already running in this
    process), asks for no GPU and sees none, and reads local files of at most
    ``LOCAL_MAX_BYTES``; anything else runs on Ray."""
    executor = executor or os.environ.get("RLVR_RAY_EXECUTOR") or "auto"
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor != "auto":
        return executor
    if address or os.environ.get("RAY_ADDRESS") or _ray_running_here():
        return "ray"
    if gpus_per_worker or has_gpu():
        return "ray"
    size = local_bytes(refs)
    return "local" if size is not None and size <= LOCAL_MAX_BYTES else "ray"


def default_threads(num_cpus: int | None, workers: int | None) -> int:
    """Threads of the in-process executor: ``workers``, else ``num_cpus``, else the CPUs this
    process may use."""
    if workers:
        return workers
    if num_cpus:
        return num_cpus
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LocalPool:
    """Runs units on ``n_threads`` threads, each with its own ScanWorker on results ``out`` (a
    ResultsDir is shared by them: see :meth:`ResultsDir.keep_parts`); the same interface as
    :class:`~rlvr_ray.engine.pool.ActorPool` (``run``, ``on_done``, ``failures``, ``retried``,
    ``first_given``, ``last_back``, ``shutdown``). ``on_done(unit, report)`` is called with each
    unit, ``report`` None when it failed, one call at a time."""

    def __init__(
        self,
        out: str | ResultsDir,
        n_threads: int,
        *,
        device: str | None = "cpu",  # None: the GPU when there is one
        on_done: Callable[[Any, dict | None], None] | None = None,
    ) -> None:
        self.out, self.n_threads, self.device = out, max(1, n_threads), device
        self.on_done = on_done
        self.failures: list[Failure] = []
        self.retried: list[str] = []  # a unit is never run twice here (no process is lost)
        self.n_done = 0
        self.first_given: float | None = None
        self.last_back: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @classmethod
    def for_machine(
        cls, out: str | ResultsDir, num_cpus: int | None, workers: int | None
    ) -> LocalPool:
        """The pool for this machine: ``default_threads`` threads on the CPU; where a GPU is
        visible (only a forced "local" runs here then), one thread on it unless ``workers``."""
        if has_gpu():
            return cls(out, workers or 1, device=None)
        return cls(out, default_threads(num_cpus, workers))

    def run(self, units: Sequence) -> None:
        """Run ``units`` to the end (each reported or failed). An interrupt (KeyboardInterrupt
        in this thread) stops handing units out and is raised at once: a unit still running
        is not marked done, so a rerun does it again."""
        from rlvr_ray.engine.worker import ScanWorker  # torch and numba: only now

        queue = UnitQueue(units, max_attempts=1, in_flight=1)
        n = min(self.n_threads, len(units))
        if not n:
            return
        # one thread each: n workers' torch ops (the SVDs) would otherwise share the cores n times
        threads_each = 1 if n > 1 else None
        errors: list[BaseException] = []

        def work() -> None:
            try:
                worker = ScanWorker(self.out, self.device, threads_each)
                pid = os.getpid()
                while not self._stop.is_set():
                    with self._lock:
                        unit = queue.take([], n)
                        if unit is None:
                            return
                        self.first_given = self.first_given or time.perf_counter()
                    self._one(worker, unit, queue, pid)
            except BaseException as e:  # a worker that cannot start: the main thread raises it
                errors.append(e)
                self._stop.set()

        threads = [
            threading.Thread(target=work, name=f"rlvr-unit-{i}", daemon=True) for i in range(n)
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(JOIN_POLL_S)
        except BaseException:
            self._stop.set()
            raise
        if errors:
            raise errors[0]

    def _one(self, worker, unit, queue: UnitQueue, pid: int) -> None:
        try:
            report = worker.run_unit(unit) | {"node_id": None, "pid": pid}
        except Exception as e:  # a bug or an unreadable input: record it, keep going
            report, failure = None, unit_failure(unit, e, one_line(e))
        with self._lock:
            if report is None:
                self.failures.append(failure)
                if failure.kind == DISK_FULL:
                    queue.clear()  # every later unit would fail the same way
            else:
                self.n_done += 1
            self.last_back = time.perf_counter()
            if self.on_done is not None:
                self.on_done(unit, report)

    def shutdown(self) -> None:
        """Stop handing out units (threads finish the one they run)."""
        self._stop.set()
