"""The driver killed mid-scan (SIGKILL of the CLI and its embedded Ray): a rerun resumes.

The rerun skips the units whose completion markers were written, redoes the rest (a unit
killed half-way rewrites its own fixed-name parts), and the results equal a clean run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from faultlib import assert_same_results, changed_in, expected_changed, sweep_dict

from rlvr_ray.cli import main
from rlvr_ray.lab.planted import planted_family

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "rlvr-ray")
FLAGS = ["--unit-mb", "0", "--no-geometry"]  # unit-mb 0: one unit per tensor (~100 units)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    fam = planted_family(
        root / "fam", "qwen2", layers=8, seed=5, runs={"grpo-a": 0.2, "grpo-b": 0.3}
    )
    sweep = root / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(sweep_dict(fam)))
    return fam, sweep


def _markers(out: Path) -> int:
    return sum(1 for _ in out.glob("units/*/*.json"))


def test_killed_driver_resumes_where_it_stopped(family, tmp_path, ray_local, capsys):
    fam, sweep = family
    clean = tmp_path / "clean"
    assert main(["scan", str(sweep), "--out", str(clean), *FLAGS]) == 0
    total = _markers(clean)
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [CLI, "scan", str(sweep), "--out", str(out), "--num-cpus", "1", *FLAGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while _markers(out) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, "scan ended too early"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    # a Ray worker outside the killed process group may finish the unit it was writing: let
    # the markers settle before counting what the rerun must skip
    done, t_end = _markers(out), time.monotonic() + 10
    while time.monotonic() < t_end:
        time.sleep(1.0)
        now = _markers(out)
        if now == done:
            break
        done = now
    assert 5 <= done < total, (done, total)
    capsys.readouterr()
    assert main(["scan", str(sweep), "--out", str(out), *FLAGS]) == 0
    said = capsys.readouterr().out
    assert f"in {total} units ({done} already done)" in said
    assert_same_results(out, clean)
    assert changed_in(out) == expected_changed(fam)
