"""The driver: plan every group, run the units on Ray actors, write scan tables and the catalog.

Actors are :class:`~rlvr_ray.engine.actor.ScanActor` (a ScanWorker) run by an
:class:`~rlvr_ray.engine.pool.ActorPool`, spread over the cluster's nodes: one per GPU when the cluster has GPUs (``gpus_per_worker`` for fractions), else
one per CPU, each asking for ``memory_gb`` of Ray's memory resource when given (units whose
largest tensor would not fit are refused by name). A unit whose actor, process or node dies is
run again on a fresh actor (units are idempotent: fixed part names), and a scan that was
interrupted resumes: units with a completion marker are skipped unless ``force``. Planning
imports neither torch nor numba: only the actors do.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from rlvr_ray import __version__
from rlvr_ray.engine import failures
from rlvr_ray.engine.config import Params, Sweep, SweepError
from rlvr_ray.engine.failures import Failure, is_disk_full, one_line
from rlvr_ray.engine.memory import over_budget
from rlvr_ray.engine.plan import GroupPlan, RunSpec, Unit, plan_group
from rlvr_ray.engine.pool import ActorPool
from rlvr_ray.engine.progress import Progress
from rlvr_ray.io import catalog
from rlvr_ray.io.checkpoint import Checkpoint, open_checkpoint
from rlvr_ray.io.families import family_for
from rlvr_ray.io.results import ResultsDir, open_results, storage_env
from rlvr_ray.io.schema import CHECKPOINTS, COMPARED_SQL, SCANS
from rlvr_ray.io.sources import source_env

DEFAULT_UNIT_BYTES = 256 * 1024 * 1024


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
    failures: list[Failure] = field(default_factory=list)  # errors, by kind / group / run / unit
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

    def fail(self, failure: Failure) -> None:
        """Record a failure, and its line in ``errors`` (a full disk sets ``disk_full``)."""
        self.failures.append(failure)
        if failure.kind == failures.DISK_FULL:
            self.disk_full = True
        else:
            self.errors.append(f"group {failure.group}: {failure.line}")


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


def _open_group(
    group, result: ScanResult
) -> tuple[Checkpoint, list[tuple[RunSpec, Checkpoint]]] | None:
    """Open the base and every run of ``group``. Whatever goes wrong opening one checkpoint
    (a bad header, an unreadable config.json, a symlink loop, a bug) skips that checkpoint
    with one line and the others go on."""
    try:
        base = open_checkpoint(group.base)
        family_for(base.config)  # the plan reads the layer count from the base's config
    except Exception as e:
        result.fail(Failure(failures.BAD_BASE, group.name, one_line(e, group.base)))
        return None
    base.ref = pinned(base.ref, base)
    runs = []
    for r in group.runs:
        try:
            ck = open_checkpoint(r.checkpoint)
        except Exception as e:
            msg = one_line(e, r.checkpoint)
            result.fail(Failure(failures.BAD_RUN, group.name, msg, run=r.name))
            continue
        ck.ref = pinned(r.checkpoint, ck)
        spec = RunSpec(
            r.name,
            ck.ref,
            ck.fingerprint,
            r.algorithm,
            r.step,
            r.dataset,
            r.seed,
            r.series,
            r.consistency,
            r.master,
        )
        if r.master:  # a master that cannot be opened: the run is scanned, without the gate
            try:
                open_checkpoint(r.master, fingerprint=False).close()
            except Exception as e:
                why = one_line(e, r.master)
                result.warnings.append(
                    f"group {group.name}: run {r.name}: no precision gate: {why}"
                )
        runs.append((spec, ck))
    return base, runs


def _scan_tables(
    plan: GroupPlan, run_cks: list[Checkpoint], params: Params
) -> tuple[pa.Table, pa.Table]:
    now = datetime.now(timezone.utc)
    scans = pa.Table.from_pylist(
        [
            {
                "scan_id": plan.scan_id,
                "group_name": plan.group.name,
                "base_ref": plan.base.ref,
                "base_fingerprint": plan.base.fingerprint,
                "family": plan.family,
                "n_runs": len(plan.runs),
                "runs": [r.name for r in plan.runs],
                "params": json.dumps(params.model_dump(), sort_keys=True),
                "n_units": len(plan.units),
                "created_at": now,
                "rlvr_ray_version": __version__,
            }
        ],
        schema=SCANS,
    )

    def row(name, ck: Checkpoint, is_base: bool, spec: RunSpec | None) -> dict:
        labels = spec.labels() if spec else {}
        return {
            "scan_id": plan.scan_id,
            "group_name": plan.group.name,
            "run": name,
            "is_base": is_base,
            "ref": ck.ref,
            "fingerprint": ck.fingerprint,
            "family": plan.family,
            **labels,
            "consistency": spec.consistency if spec else None,
            "n_tensors": len(ck.entries),
            "n_bytes": ck.n_bytes,
            "dtypes": ",".join(sorted({e.dtype for e in ck.entries.values()})),
        }

    rows = [row("base", plan.base, True, None)]
    rows += [row(s.name, ck, False, s) for s, ck in zip(plan.runs, run_cks, strict=True)]
    return scans, pa.Table.from_pylist(rows, schema=CHECKPOINTS)


def _init_ray(
    address: str | None,
    num_cpus: int | None,
    warnings: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> bool:
    """Join ``address`` / the job's cluster, or start an embedded Ray that listens on 127.0.0.1
    only; -> whether we started it. Warnings (a token file others can read) go to ``warnings``.
    An embedded Ray's processes start with ``env`` added to this process's environment (then
    actors need no runtime_env, and take the workers Ray starts ahead)."""
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
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
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
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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


def actor_class() -> type:
    """The actor class (imported here, not at the top: it imports torch and numba)."""
    from rlvr_ray.engine.actor import ScanActor

    return ScanActor


@dataclass
class Placement:
    """What each actor asks of Ray, and how many actors to start."""

    n_actors: int
    options: dict

    @classmethod
    def for_cluster(
        cls,
        out: str,
        n_units: int | None,
        workers: int | None,
        gpus_per_worker: float | None,
        memory_gb: float | None,
    ) -> Placement:
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
        return cls(max(1, min(n, n_units or n)), opts)  # n_units None: not known yet


def _start_pool(
    out: str,
    n_units: int | None,
    address: str | None,
    num_cpus: int | None,
    workers: int | None,
    gpus_per_worker: float | None,
    memory_gb: float | None,
    warnings: list[str],
) -> tuple[bool, ActorPool]:
    """Start (or join) Ray and the pool's actors, which start importing torch and numba at
    once; -> (whether Ray was started here, the pool). ``n_units`` None: not known yet (the
    pool stops the actors it will not need when it is given the units)."""
    import ray

    # the env of an embedded Ray's processes; actors of a cluster get it as a runtime_env
    env = worker_env() | storage_env(out) | source_env()
    started = _init_ray(address, num_cpus, warnings, env)
    try:
        place = Placement.for_cluster(out, n_units, workers, gpus_per_worker, memory_gb)
        if started and not (address or os.environ.get("RAY_ADDRESS")):
            # an actor with its own runtime_env gets a new worker process (~1 s of CPU each)
            place.options.pop("runtime_env")
        threads = None if place.options.get("num_gpus") else 1
        args = (out, None, threads)
        return started, ActorPool(actor_class(), place.n_actors, place.options, args)
    except BaseException:
        if started:
            ray.shutdown()
        raise


def _run_units(
    pool: ActorPool, todo: list[Unit], result: ScanResult, progress: Progress, on_unit=None
) -> None:
    """Run ``todo`` on ``pool`` (see :class:`ActorPool`); reports, failures and retries go to
    ``result``."""

    def done(unit: Unit, rep: dict | None) -> None:
        if rep is not None:
            result.n_bytes += rep["n_bytes"]
            result.skipped += rep["skipped"]
            result.units.append(rep)
            if on_unit is not None:
                on_unit(rep)
        progress.update(len(unit.tensors), unit.nbytes)

    pool.on_done = done
    try:
        pool.run(todo)
    finally:
        for failure in pool.failures:
            result.fail(failure)
        result.retried += pool.retried
        if pool.first_given and pool.last_back:
            result.unit_seconds = pool.last_back - pool.first_given


def _plan(
    sweep: Sweep,
    results: ResultsDir,
    result: ScanResult,
    force: bool,
    unit_bytes: int,
    n_units: dict[str, int],
) -> list[Unit]:
    """Open and plan every group, write its ``scans`` and ``checkpoints`` rows, note each
    scan's number of units in ``n_units``; -> the units still to run (those with a completion
    marker are skipped unless ``force``)."""
    todo: list[Unit] = []
    for group in sweep.scan_groups():  # with each group's step pairs
        opened = _open_group(group, result)
        if opened is None:
            continue
        base, runs = opened
        if not runs:
            result.fail(Failure(failures.NO_RUNS, group.name, "no run could be opened"))
            continue
        try:
            plan = plan_group(group, base, runs, sweep.params, unit_bytes)
        except Exception as e:
            msg = f"cannot plan it: {one_line(e)}"
            result.fail(Failure(failures.BAD_PLAN, group.name, msg))
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
        n_units[plan.scan_id] = len(plan.units)
        result.n_units += len(plan.units)
        result.n_tensors += plan.n_tensors
        for u in plan.units:
            if force or not results.unit_done(u.scan_id, u.index):
                todo.append(u)
            else:
                result.n_units_resumed += 1
    return todo


def _no_unit_done(results: ResultsDir) -> bool:
    """Whether no scan has completed a unit in ``results`` yet (so every planned unit runs)."""
    try:
        return not results.fs.get_file_info(
            pafs.FileSelector(results.path("units"), allow_not_found=True)
        )
    except OSError:
        return False


def run_scan(
    sweep: Sweep,
    out: str | ResultsDir,
    *,
    address: str | None = None,
    workers: int | None = None,
    num_cpus: int | None = None,
    gpus_per_worker: float | None = None,
    force: bool = False,
    progress: str | None = None,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    memory_gb: float | None = None,
    on_unit: Callable[[dict], None] | None = None,
) -> ScanResult:
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
    results = open_results(out)
    # a new results directory (or force): every planned unit runs, so Ray and the actors
    # start while the headers are read and planned (an actor's imports take seconds)
    start_early = force or _no_unit_done(results)
    results.ensure()
    result = ScanResult(results.uri)
    pool_args = (address, num_cpus, workers, gpus_per_worker, memory_gb, result.warnings)
    started, pool, stopping = False, None, None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlvr-plan") as planner:
            n_units: dict[str, int] = {}
            planned = planner.submit(_plan, sweep, results, result, force, unit_bytes, n_units)
            if start_early:
                started, pool = _start_pool(results.uri, None, *pool_args)
            todo = planned.result()
        if memory_gb:
            fit, refused = over_budget(todo, memory_gb)
            fits = {id(u) for u in fit}
            for u, line in zip([u for u in todo if id(u) not in fits], refused, strict=True):
                why = line.split(" refused: ", 1)[1]  # the line names the group and unit too
                result.fail(Failure(failures.OVER_BUDGET, u.group, why, unit=u.index))
            todo = fit
        if todo and not result.disk_full:
            if pool is None:
                started, pool = _start_pool(results.uri, len(todo), *pool_args)
            n_tensors, n_bytes = sum(len(u.tensors) for u in todo), sum(u.nbytes for u in todo)
            prog = Progress(n_tensors, n_bytes, progress)
            try:
                _run_units(pool, todo, result, prog, on_unit)
            except KeyboardInterrupt:  # what was written is kept: stop Ray and say so
                result.interrupted = True
            finally:
                prog.close()
        elif pool is not None:
            pool.shutdown()
    except BaseException:
        if pool is not None:
            pool.shutdown()
        if started:
            import ray

            ray.shutdown()
        raise
    if started:
        import ray

        if result.interrupted:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
            try:
                ray.shutdown()
            finally:
                signal.signal(signal.SIGINT, previous)
        else:  # an embedded Ray takes ~1 s to stop: let it, while the catalog is built
            stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
            stopping.start()
    if result.interrupted:
        result.seconds = time.perf_counter() - t0
        return result
    try:
        if result.scan_ids:
            finished = [s for s in result.scan_ids if len(results.units_done(s)) == n_units[s]]
            catalog.update(results, result.scan_ids, result.warnings.append, merge=finished)
            result.warnings += _identical_runs(results, result.scan_ids)
    except Exception as e:  # the parts are written; the catalog is rebuilt by the next scan
        if not is_disk_full(e):
            raise
        result.disk_full = True
    finally:
        if stopping is not None:
            stopping.join()
    result.seconds = time.perf_counter() - t0
    return result


def _identical_runs(results: ResultsDir, scan_ids: list[str]) -> list[str]:
    """A warning per run with no change in any compared tensor, saying how many were compared
    (rows of tensors that were not, e.g. an unsupported dtype, prove nothing) or that none was."""
    _, rows = catalog.query(
        results,
        f"SELECT group_name, run, count(*) FILTER (WHERE {COMPARED_SQL}), "
        "count(*) FROM tensors_all WHERE scan_id IN (SELECT unnest(?)) GROUP BY group_name, run "
        f"HAVING coalesce(sum(n_changed) FILTER (WHERE {COMPARED_SQL}), 0) = 0 "
        "ORDER BY group_name, run",
        [scan_ids],
    )
    return [
        f"group {g}: run {r}: no tensor compared (0 of {n} tensors)"
        if not k
        else f"group {g}: run {r} is bitwise identical to its base in all {k} compared tensors"
        + (f" ({n - k} of {n} not compared)" if n > k else "")
        for g, r, k, n in rows
    ]
