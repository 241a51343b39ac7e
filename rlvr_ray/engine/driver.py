"""The driver: plan every group, run the units on Ray actors, write scan tables and the catalog.

Actors are :class:`~rlvr_ray.engine.worker.ScanWorker` made remote here, one per GPU when the
cluster has GPUs, else one per CPU. A unit whose actor dies is retried by Ray on a restarted
actor (units are idempotent: fixed part names), and a scan that was interrupted resumes: units
with a completion marker are skipped unless ``force``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from rlvr_ray import __version__
from rlvr_ray.engine.config import Params, Sweep
from rlvr_ray.engine.plan import GroupPlan, RunSpec, Unit, plan_group
from rlvr_ray.engine.progress import Progress
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io import catalog
from rlvr_ray.io.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import CHECKPOINTS, SCANS

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
    errors: list[str] = field(default_factory=list)  # checkpoints/units that were skipped
    skipped: list[str] = field(default_factory=list)  # tensors that could not be compared
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: everything compared; 3: something was skipped (see errors / skipped)."""
        return 3 if self.errors or self.skipped else 0


def _open_group(group, errors: list[str]) -> tuple[Checkpoint, list[tuple[RunSpec, Checkpoint]]] | None:  # fmt: skip
    try:
        base = open_checkpoint(group.base)
    except CheckpointError as e:
        errors.append(f"group {group.name}: base skipped: {e}")
        return None
    runs = []
    for r in group.runs:
        try:
            ck = open_checkpoint(r.checkpoint)
        except CheckpointError as e:
            errors.append(f"group {group.name}: run {r.name} skipped: {e}")
            continue
        spec = RunSpec(r.name, r.checkpoint, ck.fingerprint, r.algorithm, r.step, r.dataset,
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
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level="WARNING")  # fmt: skip
    return True


def _actors(out: str, n_units: int, workers: int | None, gpus_per_worker: float | None):
    import ray

    res = ray.cluster_resources()
    gpus = res.get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus else 0.0
    if gpus_per_worker:
        n = workers or int(gpus / gpus_per_worker)
        opts = {"num_gpus": gpus_per_worker, "num_cpus": 1}
    else:
        n = workers or int(res.get("CPU", 1))
        opts = {"num_cpus": 1}
    n = max(1, min(n, n_units))
    cls = ray.remote(max_restarts=4, max_task_retries=4)(ScanWorker)
    threads = None if gpus_per_worker else 1
    return [cls.options(**opts).remote(out, None, threads) for _ in range(n)]


def _run_units(todo: list[Unit], out: str, result: ScanResult, workers, gpus_per_worker,
               progress: Progress) -> None:  # fmt: skip
    import ray

    actors = _actors(out, len(todo), workers, gpus_per_worker)
    queue = sorted(todo, key=lambda u: -u.nbytes)  # largest first balances the tail
    running = {}
    for a in actors:
        if queue:
            u = queue.pop(0)
            running[a.run_unit.remote(u)] = (a, u)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        actor, unit = running.pop(ref)
        try:
            rep = ray.get(ref)
            result.n_bytes += rep["n_bytes"]
            result.skipped += rep["skipped"]
        except Exception as e:  # a bug or an unreadable input: record, keep going
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            result.errors.append(f"group {unit.group}: unit {unit.index} failed: {msg}")
        progress.update(len(unit.tensors), unit.nbytes)
        if queue:
            u = queue.pop(0)
            running[actor.run_unit.remote(u)] = (actor, u)
    for a in actors:
        ray.kill(a)


def run_scan(sweep: Sweep, out: str, *, address: str | None = None, workers: int | None = None,
             num_cpus: int | None = None, gpus_per_worker: float | None = None,
             force: bool = False, progress: str | None = None,
             unit_bytes: int = DEFAULT_UNIT_BYTES) -> ScanResult:  # fmt: skip
    """Scan every group of ``sweep`` into the results directory ``out``."""
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
    if todo:
        started = _init_ray(address, num_cpus)
        prog = Progress(sum(len(u.tensors) for u in todo), sum(u.nbytes for u in todo), progress)
        try:
            _run_units(todo, results.uri, result, workers, gpus_per_worker, prog)
        finally:
            prog.close()
            if started:
                import ray

                ray.shutdown()
    if result.scan_ids:
        catalog.refresh(results.uri)
        result.warnings += _identical_runs(results.uri, result.scan_ids)
    result.seconds = time.perf_counter() - t0
    return result


def _identical_runs(out: str, scan_ids: list[str]) -> list[str]:
    con = catalog.connect(out)
    try:
        rows = con.execute(
            "SELECT group_name, run FROM tensors_all WHERE scan_id IN (SELECT unnest(?)) "
            "GROUP BY ALL HAVING sum(n_changed) = 0 AND count(*) FILTER "
            "(WHERE status IN ('ok', 'vocab_resized')) > 0", [scan_ids]).fetchall()  # fmt: skip
    finally:
        con.close()
    return [f"group {g}: run {r} is bitwise identical to its base in every compared tensor"
            for g, r in rows]  # fmt: skip
