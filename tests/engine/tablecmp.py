"""Scan a planted family in-process on a device and compare two scans' tables column by column."""

import pyarrow.parquet as pq
import pytest

from rlvr_ray.engine.config import Group, Params, Run
from rlvr_ray.engine.plan import RunSpec, plan_group
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io.checkpoint import open_checkpoint

KEYS = {
    "tensors": ("run", "tensor"),
    "profiles": ("run", "tensor", "axis"),  # packed: one row per profile
    "consistency": ("tensor",),
    "consensus_profiles": ("tensor", "axis"),
    "maps": ("run", "tensor", "kind"),
    "spectra": ("run", "tensor", "i"),
}
#: geometry columns: float64 eigensolves differ between devices in the last bits
CLOSE = {
    "nss",
    "max_angle_left",
    "max_angle_right",
    "rel_frob",
    "stripe_row",
    "stripe_col",
    "sigma_base",
    "sigma_run",
    "angle_left",
    "angle_right",
    "angle_error_bound",
}
CLOSE |= {
    "sigma_max_base",
    "sigma_max_run",
    "stable_rank_base",
    "stable_rank_run",
    "update_stable_rank",
    "update_effective_rank",
    "update_energy_left",
    "update_energy_right",
}
#: overlaps count a mask taken at a float ranking of |rank-k W0|: a near-tie may flip one entry
OVERLAPS = {"overlap_princ", "overlap_low", "overlap_princ_not_low"}


def scan_tables(fam, out, device: str) -> dict:
    """Every unit of ``fam`` (geometry on) by one ScanWorker on ``device`` -> {table: {key: row}}."""
    cks = [
        (RunSpec(n, str(p), open_checkpoint(str(p)).fingerprint), open_checkpoint(str(p)))
        for n, p in fam.runs.items()
    ]
    group = Group(
        name="g",
        base=str(fam.base),
        runs=[Run(name=n, checkpoint=str(p)) for n, p in fam.runs.items()],
    )
    plan = plan_group(
        group, open_checkpoint(str(fam.base)), cks, Params(rank_k=4, spectral_k=8), 1 << 28
    )
    worker = ScanWorker(str(out), device=device)
    reports = [worker.run_unit(u) for u in plan.units]
    assert {r["device"] for r in reports} == {device}
    tables = {}
    for t, keys in KEYS.items():
        rows = pq.read_table(out / "tables" / t).to_pylist()
        tables[t] = {tuple(r[k] for k in keys): r for r in rows}
    return tables


def assert_same_tables(cpu: dict, other: dict) -> dict:
    """Counts identical, geometry close; -> the largest relative difference per close column."""
    worst = {}
    for t in KEYS:
        assert cpu[t].keys() == other[t].keys() and cpu[t], t
        for key, a in cpu[t].items():
            b = other[t][key]
            for col, va in a.items():
                vb = b[col]
                if col in CLOSE and va is not None:
                    assert vb == pytest.approx(va, rel=1e-6, abs=1e-12), (t, key, col)
                    worst[col] = max(worst.get(col, 0.0), abs(vb - va) / max(abs(va), 1e-300))
                elif col in OVERLAPS and va is not None:
                    assert vb == pytest.approx(va, abs=2.0 / max(a["n_changed"], 1)), (key, col)
                else:
                    assert vb == va, (t, key, col)
    return worst
