"""The driver: plan every group, run the units on Ray actors, write scan tables and the catalog.

Actors are :class:`~rlvr_ray.engine.worker.ScanWorker` made remote here, spread over the
cluster's nodes: one per GPU when the cluster has GPUs (``gpus_per_worker`` for fractions), else
one per CPU, each asking for ``memory_gb`` of Ray's memory resource when given (units whose
largest tensor would not fit are refused by name). A unit whose actor, process or node dies is
run again on a fresh actor (units are idempotent: fixed part names), and a scan that was
interrupted resumes: units with a completion marker are skipped unless ``force``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from rlvr_ray import __version__
from rlvr_ray.engine.config import Params, Sweep
from rlvr_ray.engine.memory import over_budget
from rlvr_ray.engine.plan import GroupPlan, RunSpec, Unit, plan_group
from rlvr_ray.engine.progress import Progress
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io import catalog
from rlvr_ray.io.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from rlvr_ray.io.results import ResultsDir, storage_env
from rlvr_ray.io.schema import CHECKPOINTS, SCANS

DEFAULT_UNIT_BYTES = 256 * 1024 * 1024
MAX_ATTEMPTS = 4  # runs of one unit before it is given up (actor, process or node lost)
UNITS_IN_FLIGHT = 2  # per actor: the one it runs and the next (no idle round trip between)
PLACEMENT_TIMEOUT_S = 300  # no actor at all could be placed for this long: give up


@dataclass
class ScanResult:
    out: str
    scan_ids: list[str] = field(default_factory=list)
    n_units: int = 0
    n_units_resumed: int = 0
    n_tensors: int = 0
    n_bytes: int = 0
    seconds: float = 0.0
    unit_seconds: float = 0.0  # from the first unit handed to an actor to the last one back
    errors: list[str] = field(default_factory=list)  # checkpoints/units that were skipped
    skipped: list[str] = field(default_factory=list)  # tensors that could not be compared
    warnings: list[str] = field(default_factory=list)
    units: list[dict] = field(default_factory=list)  # unit reports (with node_id and pid)
    retried: list[str] = field(default_factory=list)  # units run again after a lost actor

    @property
    def exit_code(self) -> int:
        """0: everything compared; 3: something was skipped (see errors / skipped)."""
        return 3 if self.errors or self.skipped else 0


def pinned(ref: str, ck: Checkpoint) -> str:
    """``hf://org/name[@branch]`` -> ``hf://org/name@<commit sha>`` once resolved, so every
    worker opens the same commit from the cache (no Hub call, no race with a new push)."""
    if ref.startswith("hf://") and ck.fingerprint.startswith("hf:"):
        return f"hf://{ref[5:].split('@', 1)[0]}@{ck.fingerprint[3:]}"
    return ref


def _open_group(group, errors: list[str]) -> tuple[Checkpoint, list[tuple[RunSpec, Checkpoint]]] | None:  # fmt: skip
    try:
        base = open_checkpoint(group.base)
    except CheckpointError as e:
        errors.append(f"group {group.name}: base skipped: {e}")
        return None
    base.ref = pinned(base.ref, base)
    runs = []
    for r in group.runs:
        try:
            ck = open_checkpoint(r.checkpoint)
        except CheckpointError as e:
            errors.append(f"group {group.name}: run {r.name} skipped: {e}")
            continue
        ck.ref = pinned(r.checkpoint, ck)
        spec = RunSpec(r.name, ck.ref, ck.fingerprint, r.algorithm, r.step, r.dataset,
                       r.seed, r.series, r.consistency)  # fmt: skip
        runs.append((spec, ck))
    return base, runs


def _scan_tables(plan: GroupPlan, run_cks: list[Checkpoint], params: Params) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    now = datetime.now(timezone.utc)
    scans = pa.Table.from_pylist([{
        "scan_id": plan.scan_id, "group_name": plan.group.name, "base_ref": plan.base.ref,
        "base_fingerprint": plan.base.fingerprint, "family": plan.family,
        "n_runs": len(plan.runs), "runs": [r.name for r in plan.runs],
        "params": json.dumps(params.model_dump(), sort_keys=True), "n_units": len(plan.units),
        "created_at": now, "rlvr_ray_version": __version__,
    }], schema=SCANS)  # fmt: skip

    def row(name, ck: Checkpoint, is_base: bool, spec: RunSpec | None) -> dict:
        labels = spec.labels() if spec else {}
        return {"scan_id": plan.scan_id, "group_name": plan.group.name, "run": name,
                "is_base": is_base, "ref": ck.ref, "fingerprint": ck.fingerprint,
                "family": plan.family, **labels,
                "consistency": spec.consistency if spec else None,
                "n_tensors": len(ck.entries), "n_bytes": ck.n_bytes,
                "dtypes": ",".join(sorted({e.dtype for e in ck.entries.values()}))}  # fmt: skip

    rows = [row("base", plan.base, True, None)]
    rows += [row(s.name, ck, False, s) for s, ck in zip(plan.runs, run_cks, strict=True)]
    return scans, pa.Table.from_pylist(rows, schema=CHECKPOINTS)


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join ``address`` / the job's cluster, or start an embedded Ray; -> whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level="WARNING")
    else:  # "local": a new Ray even when `ray start` left one recorded on this machine
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level="WARNING")  # fmt: skip
    return True


def worker_env() -> dict[str, str]:
    """Environment an actor starts with (Arrow reads it when it loads): Arrow's buffers from
    the C library's allocator, not mimalloc, unless this process names one. In an actor,
    mimalloc gave the memory of a unit's Parquet writes back between units and faulted it in
    again, zeroing a 2 MiB huge page at a time: 8-15% of an actor's CPU, and a units phase
    ~10% slower (``benchmarks/scan_throughput.py``, side by side)."""
    return {"ARROW_DEFAULT_MEMORY_POOL": os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "system")}


class _Worker(ScanWorker):
    """The actor: a ScanWorker whose unit reports say where they ran (node, process)."""

    def run_unit(self, unit: Unit) -> dict:
        import ray

        rep = super().run_unit(unit)
        return rep | {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@dataclass
class Placement:
    """What each actor asks of Ray, and how many actors to start."""

    n_actors: int
    options: dict

    @classmethod
    def for_cluster(cls, out: str, n_units: int, workers: int | None,
                    gpus_per_worker: float | None, memory_gb: float | None) -> Placement:  # fmt: skip
        import ray

        res = ray.cluster_resources()
        gpus = res.get("GPU", 0)
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus else 0.0
        opts: dict = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        if gpus_per_worker:
            n = workers or int(gpus / gpus_per_worker)
            opts["num_gpus"] = gpus_per_worker
        else:
            n = workers or int(res.get("CPU", 1))
            if memory_gb:  # as many actors as the cluster's memory holds, if fewer than CPUs
                n = min(n, int(res.get("memory", 0) / (memory_gb * 2**30)) or 1)
        if memory_gb:
            opts["memory"] = int(memory_gb * 2**30)
        # actor-level env_vars merge with the job's runtime_env (working_dir kept)
        opts["runtime_env"] = {"env_vars": worker_env() | storage_env(out)}
        return cls(max(1, min(n, n_units)), opts)


def _report(rep: dict, result: ScanResult, on_unit) -> None:
    result.n_bytes += rep["n_bytes"]
    result.skipped += rep["skipped"]
    result.units.append(rep)
    if on_unit is not None:
        on_unit(rep)


def _may_stack(nbytes: int, queued: int, n_actors: int, left: int) -> bool:
    """Whether the queue's next unit (``nbytes``; ``queued`` units of ``left`` bytes in the
    queue, itself included) may wait behind an actor's running unit rather than for the first
    actor to be free: only while every other actor (live or starting) can still get a unit,
    and only if it is no more than its share of what is left per actor (which actor frees
    first is not known yet: a big unit stacked on a busy actor would end the scan late)."""
    return queued > n_actors and nbytes * n_actors <= left


def _run_units(todo: list[Unit], out: str, result: ScanResult, place: Placement,
               progress: Progress, on_unit=None) -> None:  # fmt: skip
    """Run ``todo`` on a pool of actors; a unit whose actor or node died goes back in the queue
    and runs again on a fresh actor (its parts have fixed names, so nothing is duplicated).

    Each actor holds up to UNITS_IN_FLIGHT units (it runs them in order): the next one is
    there when the running one ends, without a round trip to the driver in between. A unit
    lost once runs alone afterwards: a unit that kills its actor every time costs another
    unit at most one of its MAX_ATTEMPTS attempts."""
    import ray
    from ray.exceptions import ActorUnschedulableError, RayActorError, WorkerCrashedError

    lost_errors = (RayActorError, WorkerCrashedError, ActorUnschedulableError)
    cls = ray.remote(max_restarts=0, max_task_retries=0)(_Worker)
    threads = None if place.options.get("num_gpus") else 1

    def start():  # a new actor is usable once its ping returns
        a = cls.options(**place.options).remote(out, None, threads)
        starting[a.ping.remote()] = a

    def key(u: Unit) -> tuple[str, int]:
        return (u.scan_id, u.index)

    def give(a) -> None:  # fill actor a's in-flight list from the queue
        nonlocal first, left
        q = inflight[a]
        while queue and len(q) < UNITS_IN_FLIGHT:
            # never with a unit lost before (on either side)
            if q and (not _may_stack(queue[0].nbytes, len(queue), len(inflight) + len(starting), left)
                      or key(queue[0]) in attempts
                      or any(key(running[r][1]) in attempts for r in q)):  # fmt: skip
                return
            u = queue.pop(0)
            left -= u.nbytes
            ref = a.run_unit.remote(u)
            running[ref] = (a, u)
            q.append(ref)
            first = first or time.perf_counter()

    def done(ref, unit) -> None:  # a unit's call came back: its report or its error
        try:
            _report(ray.get(ref), result, on_unit)
        except lost_errors:
            raise
        except Exception as e:  # a bug or an unreadable input: record, keep going
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            result.errors.append(f"group {unit.group}: unit {unit.index} failed: {msg}")
        progress.update(len(unit.tensors), unit.nbytes)
        result.unit_seconds = time.perf_counter() - first

    def lose(actor, err: Exception) -> None:
        """``actor`` (its process or node) is gone: each unit it held and did not report back
        is charged an attempt and queued again (the driver cannot tell which was running: a
        unit's reply can die with its process); one fresh actor is started."""
        nonlocal left
        ray.kill(actor, no_restart=True)
        back = []
        for ref in inflight.pop(actor):
            _, unit = running.pop(ref)
            if ray.wait([ref], timeout=0)[0]:  # it may have finished before the actor went
                try:
                    done(ref, unit)
                    continue
                except lost_errors:
                    pass
            attempts[key(unit)] = n = attempts.get(key(unit), 0) + 1
            if n < MAX_ATTEMPTS:
                result.retried.append(f"group {unit.group}: unit {unit.index}: {type(err).__name__}")  # fmt: skip
                back.append(unit)
            else:
                result.errors.append(f"group {unit.group}: unit {unit.index} failed {MAX_ATTEMPTS} "
                                     f"times; last: {type(err).__name__}")  # fmt: skip
        queue[:0] = back
        left += sum(u.nbytes for u in back)
        start()

    queue = sorted(todo, key=lambda u: -u.nbytes)  # largest first balances the tail
    left = sum(u.nbytes for u in queue)  # bytes in the queue
    attempts: dict[tuple[str, int], int] = {}
    running: dict = {}  # task ref -> (actor, unit)
    inflight: dict = {}  # live actor -> its task refs, oldest (the running one) first
    starting: dict = {}  # ping ref -> actor
    actors: list = []
    for _ in range(place.n_actors):
        start()
    waiting_since = time.monotonic()
    first = None
    while queue or running:
        for a in list(inflight):
            give(a)
        if not running and not starting:
            start()
        ready, _ = ray.wait([*running, *starting], num_returns=1, timeout=10)
        if not ready:
            if not running and time.monotonic() - waiting_since > PLACEMENT_TIMEOUT_S:
                for u in queue:
                    result.errors.append(f"group {u.group}: unit {u.index} not run: no actor "
                                         f"could be placed in {PLACEMENT_TIMEOUT_S} s "
                                         f"(asked for {place.options})")  # fmt: skip
                queue.clear()
            continue
        ref = ready[0]
        waiting_since = time.monotonic()
        if ref in starting:
            a = starting.pop(ref)
            try:
                ray.get(ref)
                actors.append(a)
                inflight[a] = []
            except lost_errors:
                pass  # died before it started; the loop starts another if none is left
            continue
        actor = running[ref][0]
        q = inflight[actor]
        while ref in q:  # an actor runs its calls in order: take them in order, up to ref
            r = q[0]
            try:
                done(r, running[r][1])
            except lost_errors as e:  # the actor, its process or its node is gone
                lose(actor, e)
                break
            q.pop(0)
            running.pop(r)
    for a in [*actors, *starting.values()]:
        ray.kill(a, no_restart=True)


def run_scan(sweep: Sweep, out: str, *, address: str | None = None, workers: int | None = None,
             num_cpus: int | None = None, gpus_per_worker: float | None = None,
             force: bool = False, progress: str | None = None,
             unit_bytes: int = DEFAULT_UNIT_BYTES, memory_gb: float | None = None,
             on_unit: Callable[[dict], None] | None = None) -> ScanResult:  # fmt: skip
    """Scan every group of ``sweep`` into the results directory ``out`` (a path or a URI).

    ``memory_gb``: memory per actor (Ray's ``memory`` resource); units with a tensor needing
    more are refused (see :func:`over_budget`). ``on_unit``: called in the driver with each
    finished unit's report (``node_id``, ``pid``, ``seconds``, ...).
    """
    t0 = time.perf_counter()
    results = ResultsDir(out)
    results.ensure()
    result = ScanResult(results.uri)
    todo: list[Unit] = []
    for group in sweep.groups:
        opened = _open_group(group, result.errors)
        if opened is None:
            continue
        base, runs = opened
        if not runs:
            result.errors.append(f"group {group.name}: no run could be opened; group skipped")
            continue
        plan = plan_group(group, base, runs, sweep.params, unit_bytes)
        result.scan_ids.append(plan.scan_id)
        scans, cks = _scan_tables(plan, [ck for _, ck in runs], sweep.params)
        if force or not results.exists("tables", "scans", f"{plan.scan_id}.parquet"):
            results.write_table("scans", plan.scan_id, scans)
        results.write_table("checkpoints", plan.scan_id, cks)
        result.n_units += len(plan.units)
        result.n_tensors += plan.n_tensors
        for u in plan.units:
            if force or not results.unit_done(u.scan_id, u.index):
                todo.append(u)
            else:
                result.n_units_resumed += 1
    if memory_gb:
        todo, refused = over_budget(todo, memory_gb)
        result.errors += refused
    stopping = None
    if todo:
        import ray

        started = _init_ray(address, num_cpus)
        prog = Progress(sum(len(u.tensors) for u in todo), sum(u.nbytes for u in todo), progress)
        try:
            place = Placement.for_cluster(results.uri, len(todo), workers, gpus_per_worker,
                                          memory_gb)  # fmt: skip
            _run_units(todo, results.uri, result, place, prog, on_unit)
        except BaseException:
            prog.close()
            if started:
                ray.shutdown()
            raise
        prog.close()
        if started:  # an embedded Ray takes ~1 s to stop: let it, while the catalog is built
            stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
            stopping.start()
    try:
        if result.scan_ids:
            catalog.refresh(results.uri)
            result.warnings += _identical_runs(results.uri, result.scan_ids)
    finally:
        if stopping is not None:
            stopping.join()
    result.seconds = time.perf_counter() - t0
    return result


def _identical_runs(out: str, scan_ids: list[str]) -> list[str]:
    _, rows = catalog.query(
        out, "SELECT group_name, run FROM tensors_all WHERE scan_id IN (SELECT unnest(?)) "
        "GROUP BY ALL HAVING sum(n_changed) = 0 AND count(*) FILTER "
        "(WHERE status IN ('ok', 'vocab_resized')) > 0", [scan_ids])  # fmt: skip
    return [f"group {g}: run {r} is bitwise identical to its base in every compared tensor"
            for g, r in rows]  # fmt: skip
