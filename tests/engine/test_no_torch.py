"""A CPU worker with the numba kernels scans bf16 tensors without importing torch.

Each scan runs in a subprocess of its own (a fresh ``sys.modules``): ScanWorker(out,
device="cpu") runs every unit of a planted Qwen2 group (a base, three runs; geometry off) and
torch must never have been imported, while its tables equal, row for row, those of the same
scan in a process where torch is loaded, and those of the torch pass (``RLVR_RAY_KERNELS=torch``)
but for the float64 sums of squares, which the two passes add in another order. Geometry on,
or a run stored as F32 (torch's rounding defines its bf16 patterns), still works: torch is then
imported when it is needed. The counts are checked against numpy's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from rlvr_ray.lab.planted import planted_family

from .varied_sweep import read_tables

ROOT = Path(__file__).resolve().parents[2]
#: scans, one after another, in one process: each (out, RLVR_RAY_KERNELS, geometry, runs) ->
#: whether torch was imported before its worker's first unit and after its last, whether the
#: worker took the fused pass, its units, and torch's threads (the worker asks for 1)
SCAN = """
import json, os, sys
from rlvr_ray.engine.config import Group, Params, Run
from rlvr_ray.engine.plan import RunSpec, plan_group
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io.checkpoint import open_checkpoint

base, jobs, preload = json.loads(sys.argv[1])
if preload:
    import torch  # noqa: F401
for out, kernels, geometry, runs in jobs:
    os.environ["RLVR_RAY_KERNELS"] = kernels
    group = Group(name="g", base=base, runs=[Run(name=n, checkpoint=p) for n, p in runs.items()])
    cks = [(RunSpec.of(r, ck), ck) for r in group.runs for ck in [open_checkpoint(r.checkpoint)]]
    params = Params(geometry=geometry, rank_k=4, spectral_k=8)
    plan = plan_group(group, open_checkpoint(base), cks, params, 1 << 15)
    worker = ScanWorker(out, device="cpu", threads=1)
    before = "torch" in sys.modules
    for unit in plan.units:
        worker.run_unit(unit)
    after = "torch" in sys.modules
    threads = sys.modules["torch"].get_num_threads() if after else None
    print(json.dumps([before, after, worker.fused, len(plan.units), threads]))
"""
#: float64 sums of squares, which the fused and the torch pass add in different orders
SUMS = ("rel_frob",)
#: a small Qwen2 (hidden 64, intermediate 160, 4 heads, 2 KV heads, vocabulary 300, biases)
DIMS = (64, 160, 4, 2, 300, True)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("notorch")
    fam = planted_family(root, runs={"grpo": 0.3, "dapo": 0.2, "sft": 0.6}, seed=3, dims=DIMS)
    # the grpo run again, every tensor stored as F32 (exactly its bf16 values)
    f32 = root / "grpo-f32"
    f32.mkdir()
    (f32 / "config.json").write_text((fam.runs["grpo"] / "config.json").read_text())
    tensors = {k: (v.astype(np.uint32) << 16).view(np.float32) for k, v in fam.bits["grpo"].items()}
    save_file(tensors, str(f32 / "model.safetensors"), metadata={"format": "pt"})
    return fam, f32


def scan(fam, jobs: list[tuple], preload: bool = False) -> list[list]:
    """``jobs`` (out, kernels, geometry, runs or None: every run) scanned in order in one fresh
    process (``preload``: which imports torch first) -> per job [torch imported before its
    units, after them, fused pass, units, torch's threads]."""
    every = {n: str(p) for n, p in fam.runs.items()}
    jobs = [(str(out), kernels, geometry, runs or every) for out, kernels, geometry, runs in jobs]
    arg = json.dumps([str(fam.base), jobs, preload])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCAN, arg], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(jobs) :]]


def tensors(out: Path) -> dict[tuple[str, str], dict]:
    """The tensors table's rows by (run, tensor)."""
    rows = pq.read_table(out / "tables" / "tensors").to_pylist()
    return {(r["run"], r["tensor"]): r for r in rows}


def changed(b0: np.ndarray, b1: np.ndarray) -> int:
    """numpy's count of changed bf16 values (+0 == -0)."""
    return int(((b0 != b1) & (((b0 | b1) & 0x7FFF) != 0)).sum())


def test_a_bf16_scan_on_the_cpu_never_imports_torch(family, tmp_path):
    fam, _ = family
    [got] = scan(fam, [(tmp_path / "fused", "numba", False, None)])
    assert got[:3] == [False, False, True] and got[3] > 1
    loaded, by_torch = scan(
        fam,
        [(tmp_path / "loaded", "numba", False, None), (tmp_path / "torch", "torch", False, None)],
        preload=True,
    )
    assert loaded[2] and not by_torch[2]  # the fused pass, then the torch pass
    fused = read_tables(tmp_path / "fused")
    assert fused == read_tables(tmp_path / "loaded")  # row for row, every value's exact repr
    ref = read_tables(tmp_path / "torch")
    assert fused.keys() == ref.keys() and all(fused[t] == ref[t] for t in fused if t != "tensors")
    rows, ref_rows = tensors(tmp_path / "fused"), tensors(tmp_path / "torch")
    assert rows.keys() == ref_rows.keys() and len(rows) == 3 * len(fam.bits["base"])
    for key, row in rows.items():
        want = ref_rows[key]
        assert {k: v for k, v in row.items() if k not in SUMS and k != "scan_id"} == {
            k: v for k, v in want.items() if k not in SUMS and k != "scan_id"
        }
        assert row["rel_frob"] == pytest.approx(want["rel_frob"], rel=1e-12)
        run, name = key
        assert row["n_changed"] == changed(fam.bits["base"][name], fam.bits[run][name])


def test_geometry_and_an_f32_run_import_torch_when_needed(family, tmp_path):
    fam, f32 = family
    both = {"grpo": str(fam.runs["grpo"]), "grpo-f32": str(f32)}
    [geo] = scan(fam, [(tmp_path / "geo", "numba", True, None)])
    assert geo[:3] == [False, True, True] and geo[4] == 1  # torch came in with 1 thread
    as_f32, by_torch = scan(
        fam, [(tmp_path / "f32", "numba", False, both), (tmp_path / "ref", "torch", True, None)]
    )
    assert as_f32[:3] == [False, True, True] and not by_torch[2]
    rows, ref = tensors(tmp_path / "geo"), tensors(tmp_path / "ref")
    measured = [k for k, r in rows.items() if r["geometry_status"] == "ok"]
    assert measured and all(rows[k]["nss"] == ref[k]["nss"] for k in measured)
    rows = tensors(tmp_path / "f32")
    for name, b0 in fam.bits["base"].items():
        bf16, fp32 = rows[("grpo", name)], rows[("grpo-f32", name)]
        assert (bf16["dtype_run"], fp32["dtype_run"]) == ("BF16", "F32")
        assert bf16["n_changed"] == fp32["n_changed"] == changed(b0, fam.bits["grpo"][name])
