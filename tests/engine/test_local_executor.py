"""The in-process executor: the same tables as Ray's actors, chosen for small local scans, one
bad unit failing alone."""

import json
import os
import subprocess
import sys

import pytest

from rlvr_ray.engine import local
from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.io.results import ResultsDir
from tests.engine.varied_sweep import compare
from tests.faultlib import expected_changed


def family_sweep(fam, geometry: bool) -> dict:
    return {
        "groups": [
            {
                "name": "g",
                "base": str(fam.base),
                "runs": [{"name": n, "checkpoint": str(p)} for n, p in fam.runs.items()],
            }
        ],
        "params": {"geometry": geometry},
    }


def test_local_threads_write_the_same_tables_as_ray_actors(qwen_family, tmp_path, ray_local):
    sweep = sweep_from_dict(family_sweep(qwen_family, geometry=True), tmp_path)
    on_ray = run_scan(sweep, str(tmp_path / "ray"), executor="ray", unit_bytes=64 << 10)
    results = ResultsDir(tmp_path / "local")  # a caller's: it keeps no parts after the scan
    here = run_scan(sweep, results, executor="local", workers=2, unit_bytes=64 << 10)
    assert results.kept is None
    assert (on_ray.executor, here.executor) == ("ray", "local")
    assert on_ray.exit_code == here.exit_code == 0
    assert here.n_units == on_ray.n_units > 2  # several units, on two threads
    assert {u["pid"] for u in here.units} == {os.getpid()}
    # every table but ``scans`` (it records when the scan started)
    assert [
        d for d in compare(tmp_path / "ray", tmp_path / "local") if "table scans" not in d
    ] == []


def test_auto_scans_a_small_local_pair_in_process_without_ray(qwen_family, tmp_path):
    code = (
        "import json, sys\n"
        "from rlvr_ray import api\n"
        f"r = api.scan({family_sweep(qwen_family, geometry=False)!r}, "
        f"out={str(tmp_path / 'out')!r})\n"
        "con = api.open_atlas(r.out)\n"
        "n = con.execute('SELECT sum(n_changed) FROM tensors').fetchall()[0][0]\n"
        "print(json.dumps([r.executor, r.exit_code, 'ray' in sys.modules, int(n)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RLVR_RAY_EXECUTOR")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    executor, code_, ray_imported, changed = json.loads(out.stdout.strip().splitlines()[-1])
    assert (executor, code_, ray_imported) == ("local", 0, False)
    assert changed == sum(expected_changed(qwen_family).values())


@pytest.mark.parametrize(
    ("executor", "refs", "address", "env", "want"),
    [
        ("ray", ["SMALL"], None, {}, "ray"),
        ("local", ["hf://org/model"], None, {}, "local"),
        ("auto", ["SMALL"], None, {}, "local"),
        (None, ["SMALL"], None, {}, "local"),
        (None, ["SMALL"], None, {"RLVR_RAY_EXECUTOR": "ray"}, "ray"),
        ("auto", ["SMALL"], "127.0.0.1:6379", {}, "ray"),
        ("auto", ["SMALL"], None, {"RAY_ADDRESS": "127.0.0.1:6379"}, "ray"),
        ("auto", ["SMALL", "hf://org/model"], None, {}, "ray"),
        ("auto", ["SMALL", "s3://bucket/run"], None, {}, "ray"),
        ("auto", ["BIG"], None, {}, "ray"),
    ],
)
def test_choose(tmp_path, monkeypatch, executor, refs, address, env, want):
    for k in ("RAY_ADDRESS", "RLVR_RAY_EXECUTOR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # the session's Ray: not this scan's
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    (small / "model.safetensors").write_bytes(b"x" * 100)
    (small / "notes.txt").write_bytes(b"x" * 10_000)  # not a checkpoint file: not counted
    (big / "model.safetensors").write_bytes(b"x" * 101)
    monkeypatch.setattr(local, "LOCAL_MAX_BYTES", 100)
    paths = [str(small) if r == "SMALL" else str(big) if r == "BIG" else r for r in refs]
    if not local.has_gpu():
        assert local.choose(executor, paths, address, None) == want
    assert local.choose("auto", [str(small)], None, 1.0) == "ray"  # a GPU asked for


def test_choose_refuses_an_unknown_executor(monkeypatch):
    monkeypatch.setenv("RLVR_RAY_EXECUTOR", "threads")
    with pytest.raises(ValueError, match="executor must be one of auto, ray, local, got 'threads'"):
        local.choose(None, [], None, None)


def test_a_unit_that_fails_locally_is_one_failure_and_the_others_finish(qwen_family, tmp_path):
    """A results directory whose tensors table cannot take one unit's part: that unit fails
    with one line, the others are written and marked done, and a rerun resumes only it."""
    sweep = sweep_from_dict(family_sweep(qwen_family, geometry=False), tmp_path)
    out = tmp_path / "out"
    first = run_scan(sweep, str(out), executor="local", workers=2, unit_bytes=64 << 10)
    n = first.n_units
    assert n > 2 and first.exit_code == 0
    scan_id = first.scan_ids[0]
    victim = out / "tables" / "tensors" / f"{scan_id}.parquet"
    # the merged part is gone; make unit 1's part path a directory: its write fails
    (out / "units" / scan_id / "00001.json").unlink()
    (out / "tables" / "tensors" / f"{scan_id}-00001.parquet").mkdir(parents=True)
    again = run_scan(sweep, str(out), executor="local", workers=2, unit_bytes=64 << 10)
    assert victim.exists()
    assert [(f.kind, f.unit) for f in again.failures] == [("unit_error", 1)]
    assert again.n_units_resumed == n - 1 and again.exit_code == 3
