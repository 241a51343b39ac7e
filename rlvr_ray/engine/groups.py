"""Open and plan each group of a sweep, and write its ``scans`` and ``checkpoints`` rows.

Whatever goes wrong with one checkpoint or one group is recorded in the scan's result and the
others go on. Nothing here imports torch or numba.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs

from rlvr_ray import __version__
from rlvr_ray.engine import failures
from rlvr_ray.engine.config import Params, Sweep
from rlvr_ray.engine.failures import Failure, is_disk_full, one_line
from rlvr_ray.engine.plan import GroupPlan, RunSpec, Unit, plan_group
from rlvr_ray.engine.result import ScanResult
from rlvr_ray.io.checkpoint import Checkpoint, open_checkpoint
from rlvr_ray.io.families import family_for
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import CHECKPOINTS, SCANS


def checkpoint_refs(group, masters: bool = False) -> list[tuple[str, str]]:
    """(what, reference) of every checkpoint ``group`` scans: "base", "run R" (and with
    ``masters``, "run R: master" for each fp32 master)."""
    refs = [("base", group.base), *((f"run {r.name}", r.checkpoint) for r in group.runs)]
    if masters:
        refs += [(f"run {r.name}: master", r.master) for r in group.runs if r.master]
    return refs


def missing_refs(sweep: Sweep) -> list[str]:
    """Local checkpoint paths of ``sweep`` that do not exist, as "group G: run R: PATH"
    (remote references, ``hf://`` or ``s3://``, are resolved by the scan; a missing master is
    that run's precision-gate status)."""
    out = []
    for g in sweep.groups:
        for what, ref in checkpoint_refs(g):
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
        spec = RunSpec.of(r, ck)
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
