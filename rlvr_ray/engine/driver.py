"""The driver: plan every group, run the units on Ray actors, write scan tables and the catalog.

Actors are :class:`~rlvr_ray.engine.worker.ScanWorker` made remote here, spread over the
cluster's nodes: one per GPU when the cluster has GPUs (``gpus_per_worker`` for fractions), else
one per CPU, each asking for ``memory_gb`` of Ray's memory resource when given (units whose
largest tensor would not fit are refused by name). A unit whose actor, process or node dies is
run again on a fresh actor (units are idempotent: fixed part names), and a scan that was
interrupted resumes: units with a completion marker are skipped unless ``force``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from rlvr_ray import __version__
from rlvr_ray.engine.config import Params, Sweep, SweepError
from rlvr_ray.engine.memory import over_budget
from rlvr_ray.engine.plan import GroupPlan, RunSpec, Unit, plan_group
from rlvr_ray.engine.progress import Progress
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io import catalog
from rlvr_ray.io.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from rlvr_ray.io.families import family_for
from rlvr_ray.io.results import ResultsDir, storage_env
from rlvr_ray.io.schema import CHECKPOINTS, SCANS
from rlvr_ray.io.sources import source_env

DEFAULT_UNIT_BYTES = 256 * 1024 * 1024
MAX_ATTEMPTS = 4  # runs of one unit before it is given up (actor, process or node lost)
UNITS_IN_FLIGHT = 2  # per actor: the one it runs and the next (no idle round trip between)
PLACEMENT_TIMEOUT_S = 300  # no actor at all could be placed for this long: give up


@dataclass(frozen=True)
class Failure:
    """What could not be scanned: one run of a group (``run``), or the whole group (``run`` is
    None: its base, its plan, or a unit, which holds tensors of every run of the group)."""

    group: str
    run: str | None
    reason: str  # one line
    unit: int | None = None


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
    failures: list[Failure] = field(default_factory=list)  # errors, by group / run / unit
    disk_full: bool = False  # writing results ran out of space: the scan stopped early
    interrupted: bool = False  # Ctrl-C (SIGINT): the scan stopped early

    @property
    def exit_code(self) -> int:
        """0: everything compared; 3: something was skipped (see errors / skipped) or the disk
        filled up; 130: interrupted."""
        if self.interrupted:
            return 130
        return 3 if self.errors or self.skipped or self.disk_full else 0

    @property
    def n_units_kept(self) -> int:
        """Units whose results are in the results directory (resumed ones included)."""
        return self.n_units_resumed + len(self.units)

    def fail(self, group: str, what: str, reason: str, run: str | None = None,
             unit: int | None = None) -> None:  # fmt: skip
        """Record a failure; ``what`` says what was skipped ("run grpo skipped")."""
        self.failures.append(Failure(group, run, reason, unit))
        self.errors.append(f"group {group}: {what}: {reason}")


def one_line(e: BaseException, ref: str | None = None) -> str:
    """A failure as one line: a CheckpointError's own message (it names the checkpoint, file
    and tensor); anything else as ``[ref: ]Type: first line``."""
    if isinstance(e, CheckpointError):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    lines = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return f"{ref}: {msg}" if ref else msg


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (an OSError, or a Ray / DuckDB / Arrow error carrying one) is ENOSPC."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def missing_refs(sweep: Sweep) -> list[str]:
    """Local checkpoint paths of ``sweep`` that do not exist, as "group G: run R: PATH"
    (remote references, ``hf://`` or ``s3://``, are resolved by the scan)."""
    out = []
    for g in sweep.groups:
        for what, ref in [("base", g.base), *((f"run {r.name}", r.checkpoint) for r in g.runs)]:
            if "://" not in ref and not os.path.exists(ref):
                out.append(f"group {g.name}: {what}: {ref}")
    return out


def pinned(ref: str, ck: Checkpoint) -> str:
    """The reference that reopens exactly what was opened as ``ref``, as its source pinned it
    (``hf://org/name[@branch]`` -> ``hf://org/name@<commit sha>``): every worker reads the
    same bytes (no race with a new push)."""
    return ck.pinned or ref


def _open_group(group, result: ScanResult) -> tuple[Checkpoint, list[tuple[RunSpec, Checkpoint]]] | None:  # fmt: skip
    """Open the base and every run of ``group``. Whatever goes wrong opening one checkpoint
    (a bad header, an unreadable config.json, a symlink loop, a bug) skips that checkpoint
    with one line and the others go on."""
    try:
        base = open_checkpoint(group.base)
        family_for(base.config)  # the plan reads the layer count from the base's config
    except Exception as e:
        result.fail(group.name, "base skipped", one_line(e, group.base))
        return None
    base.ref = pinned(base.ref, base)
    runs = []
    for r in group.runs:
        try:
            ck = open_checkpoint(r.checkpoint)
        except Exception as e:
            result.fail(group.name, f"run {r.name} skipped", one_line(e, r.checkpoint), r.name)
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


def _init_ray(
    address: str | None, num_cpus: int | None, warnings: list[str] | None = None
) -> bool:
    """Join ``address`` / the job's cluster, or start an embedded Ray that listens on 127.0.0.1
    only; -> whether we started it. Warnings (a token file others can read) go to ``warnings``."""
    import ray

    if ray.is_initialized():
        return False
    joining = bool(address or os.environ.get("RAY_ADDRESS"))
    msg = _check_token_file(create=not joining)
    if msg and warnings is not None:
        warnings.append(msg)
    if joining:
        ray.init(address=address, logging_level="WARNING")
        return True
    # "local": a new Ray even when `ray start` left one recorded on this machine. Ray turns a
    # loopback node address into the machine's outward one (and its services then listen on
    # every interface) unless it runs single-machine, as on macOS and Windows: that mode is
    # read while ray.init starts the node, so it is on for that call only.
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    return True


def _check_token_file(create: bool) -> str | None:
    """Token authentication (Ray's default for a new local Ray unless ``RAY_AUTH_MODE`` says
    otherwise) with a token file only its owner can read: ``create`` makes a missing
    ``~/.ray/auth_token`` with mode 0600 (Ray would write it with the umask's, usually 0644);
    -> a one-line warning when an existing token file is readable by group or others."""
    auth_mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if auth_mode != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if create and not named:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # as `ray get-auth-token --generate`: 256 bits
            return None
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return (
            f"the Ray token file {path} is readable by group or others (mode {mode:04o}); "
            f"anyone who reads it can run code on this Ray: chmod 600 {path}"
        )
    return None


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
        opts["runtime_env"] = {"env_vars": worker_env() | storage_env(out) | source_env()}
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
            if is_disk_full(e):  # every later unit would fail the same way: stop handing out
                result.disk_full = True
                queue.clear()
            else:
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                result.fail(unit.group, f"unit {unit.index} failed", msg, unit=unit.index)
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
                result.fail(unit.group, f"unit {unit.index} failed {MAX_ATTEMPTS} times; last",
                            type(err).__name__, unit=unit.index)  # fmt: skip
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
                    result.fail(u.group, f"unit {u.index} not run", f"no actor could be placed "
                                f"in {PLACEMENT_TIMEOUT_S} s (asked for {place.options})",
                                unit=u.index)  # fmt: skip
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

    A local checkpoint path that does not exist raises :class:`SweepError` before anything is
    created or started. The results directory filling up, or an interrupt (SIGINT), stop the
    scan early with what was written kept (``disk_full``, ``interrupted``); a rerun resumes.
    """
    t0 = time.perf_counter()
    missing = missing_refs(sweep)
    if missing:
        raise SweepError(f"no such checkpoint: {'; '.join(missing)}")
    results = ResultsDir(out)
    results.ensure()
    result = ScanResult(results.uri)
    todo: list[Unit] = []
    for group in sweep.scan_groups():  # with each group's step pairs
        opened = _open_group(group, result)
        if opened is None:
            continue
        base, runs = opened
        if not runs:
            result.fail(group.name, "group skipped", "no run could be opened")
            continue
        try:
            plan = plan_group(group, base, runs, sweep.params, unit_bytes)
        except Exception as e:
            result.fail(group.name, "group skipped", f"cannot plan it: {one_line(e)}")
            continue
        scans, cks = _scan_tables(plan, [ck for _, ck in runs], plan.params)
        try:
            if force or not results.exists("tables", "scans", f"{plan.scan_id}.parquet"):
                results.write_table("scans", plan.scan_id, scans)
            results.write_table("checkpoints", plan.scan_id, cks)
        except OSError as e:
            if not is_disk_full(e):
                raise
            result.disk_full = True
            break
        result.scan_ids.append(plan.scan_id)
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
    if todo and not result.disk_full:
        import ray

        started = _init_ray(address, num_cpus, result.warnings)
        prog = Progress(sum(len(u.tensors) for u in todo), sum(u.nbytes for u in todo), progress)
        try:
            place = Placement.for_cluster(results.uri, len(todo), workers, gpus_per_worker,
                                          memory_gb)  # fmt: skip
            _run_units(todo, results.uri, result, place, prog, on_unit)
        except KeyboardInterrupt:  # what was written is kept: stop Ray and say so
            result.interrupted = True
        except BaseException:
            prog.close()
            if started:
                ray.shutdown()
            raise
        if result.interrupted:
            prog.close()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
            try:
                if started:
                    ray.shutdown()
            finally:
                signal.signal(signal.SIGINT, previous)
            result.seconds = time.perf_counter() - t0
            return result
        prog.close()
        if started:  # an embedded Ray takes ~1 s to stop: let it, while the catalog is built
            stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
            stopping.start()
    try:
        if result.scan_ids:
            catalog.refresh(results.uri, warn=result.warnings.append)
            result.warnings += _identical_runs(results.uri, result.scan_ids)
    except Exception as e:  # the parts are written; the catalog is rebuilt by the next scan
        if not is_disk_full(e):
            raise
        result.disk_full = True
    finally:
        if stopping is not None:
            stopping.join()
    result.seconds = time.perf_counter() - t0
    return result


def _identical_runs(out: str, scan_ids: list[str]) -> list[str]:
    """A warning per run with no change in any compared tensor, saying how many were compared
    (rows of tensors that were not, e.g. an unsupported dtype, prove nothing) or that none was."""
    _, rows = catalog.query(
        out, "SELECT group_name, run, count(*) FILTER (WHERE status IN ('ok', 'vocab_resized')), "
        "count(*) FROM tensors_all WHERE scan_id IN (SELECT unnest(?)) GROUP BY group_name, run "
        "HAVING coalesce(sum(n_changed) FILTER (WHERE status IN ('ok', 'vocab_resized')), 0) = 0 "
        "ORDER BY group_name, run", [scan_ids])  # fmt: skip
    return [f"group {g}: run {r}: no tensor compared (0 of {n} tensors)" if not k else
            f"group {g}: run {r} is bitwise identical to its base in all {k} compared tensors"
            + (f" ({n - k} of {n} not compared)" if n > k else "")
            for g, r, k, n in rows]  # fmt: skip
