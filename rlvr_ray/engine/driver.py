"""The driver: plan every group, run the units on Ray actors (or, for a small scan on one
machine, on threads of this process: :mod:`~rlvr_ray.engine.local`), write scan tables and the
catalog.

Groups are opened and planned by :mod:`~rlvr_ray.engine.groups`; Ray and the actors are started
by :mod:`~rlvr_ray.engine.cluster`. Actors are :class:`~rlvr_ray.engine.actor.ScanActor` (a
ScanWorker) run by an :class:`~rlvr_ray.engine.pool.ActorPool`, spread over the cluster's nodes:
one per GPU when the cluster has GPUs (``gpus_per_worker`` for fractions), else one per CPU,
each asking for ``memory_gb`` of Ray's memory resource when given (units whose largest tensor
would not fit are refused by name). A unit whose actor, process or node dies is run again on a
fresh actor (units are idempotent: fixed part names), and a scan that was interrupted resumes:
units with a completion marker are skipped unless ``force``. Planning imports neither torch nor
numba: only the actors do.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from rlvr_ray.engine import failures
from rlvr_ray.engine.cluster import Placement, _init_ray, _start_pool, worker_env  # noqa: F401
from rlvr_ray.engine.config import Sweep, SweepError
from rlvr_ray.engine.failures import Failure, is_disk_full
from rlvr_ray.engine.groups import (  # noqa: F401
    _no_unit_done,
    _open_group,
    _plan,
    checkpoint_refs,
    missing_refs,
    pinned,
)
from rlvr_ray.engine.local import LocalPool, choose
from rlvr_ray.engine.memory import over_budget
from rlvr_ray.engine.plan import Unit
from rlvr_ray.engine.pool import ActorPool
from rlvr_ray.engine.progress import Progress
from rlvr_ray.engine.result import ScanResult
from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir, open_results
from rlvr_ray.io.schema import COMPARED_SQL
from rlvr_ray.probes import settled

DEFAULT_UNIT_BYTES = 256 * 1024 * 1024


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
    executor: str | None = None,
) -> ScanResult:
    """Scan every group of ``sweep`` into the results directory ``out`` (a path or a URI).

    ``memory_gb``: memory per actor (Ray's ``memory`` resource); units with a tensor needing
    more are refused (see :func:`over_budget`). ``on_unit``: called in the driver with each
    finished unit's report (``node_id``, ``pid``, ``seconds``, ...). ``executor``: "ray",
    "local" (threads of this process, no Ray: ``workers`` or ``num_cpus`` threads) or "auto"
    (the default, or ``$RLVR_RAY_EXECUTOR``): in-process for a small scan of local files on a
    machine without a GPU that joins no cluster (:func:`rlvr_ray.engine.local.choose`).

    A local checkpoint path that does not exist raises :class:`SweepError` before anything is
    created or started. The results directory filling up, or an interrupt (SIGINT), stop the
    scan early with what was written kept (``disk_full``, ``interrupted``); a rerun resumes.
    """
    t0 = time.perf_counter()
    missing = missing_refs(sweep)
    if missing:
        raise SweepError(f"no such checkpoint: {'; '.join(missing)}")
    results = open_results(out)
    refs = [ref for g in sweep.groups for _, ref in checkpoint_refs(g, masters=True)]
    local = choose(executor, refs, address, gpus_per_worker) == "local"
    if not local:  # this process makes no worker (the actors are in theirs): it is set up
        settled()
    # a new results directory (or force): every planned unit runs, so Ray and the actors
    # start while the headers are read and planned (an actor's imports take seconds)
    start_early = not local and (force or _no_unit_done(results))
    results.ensure()
    # in-process, the parts written are kept in memory for the merge and the atlas until the
    # scan ends (a caller's ResultsDir does not hold them after it); a first scan of a local
    # directory has its atlas's tables and views made while the units run
    blank = catalog.Blank.for_scan(results)
    with results.keeping_parts(local), _discarding(blank):
        result = ScanResult(results.uri, executor="local" if local else "ray")
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
                if local:
                    pool = LocalPool.for_machine(results, num_cpus, workers)
                elif pool is None:
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
                catalog.update(
                    results, result.scan_ids, result.warnings.append, merge=finished, blank=blank
                )
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


@contextlib.contextmanager
def _discarding(blank: catalog.Blank | None):
    try:
        yield
    finally:
        if blank is not None:
            blank.discard()


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
