"""Two scans in two processes (the CLI, each with its own embedded Ray) into one results
directory, their atlas updates made to overlap: both scans' rows land, once each."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from faultlib import changed_in, duplicates, expected_changed, sweep_dict

from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "rlvr-ray")


def test_two_scans_ending_together_both_land_once(qwen_family, llama_family, tmp_path):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    procs = []
    with open(out / "atlas.lock", "a") as lock:
        # hold the atlas's lock until both scans have written every unit: both then wait for
        # it, and their updates run one right after the other
        fcntl.flock(lock, fcntl.LOCK_EX)
        for group, fam in (("q", qwen_family), ("l", llama_family)):
            sweep = tmp_path / f"{group}.yaml"
            sweep.write_text(yaml.safe_dump(sweep_dict(fam, group=group)))
            argv = [CLI, "scan", str(sweep), "--out", str(out), "--num-cpus", "1"]
            argv += ["--unit-mb", "0", "--no-geometry"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 300
        while len(list(out.glob("tables/scans/*.parquet"))) < 2 or any(
            len(results.units_done(p.stem)) < n
            for p, n in zip(sorted(out.glob("tables/scans/*.parquet")), _units(out), strict=True)
        ):
            assert time.monotonic() < deadline, "the scans did not finish their units"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.2)
        assert not (out / "atlas.duckdb").exists()  # nobody got past the lock yet
        fcntl.flock(lock, fcntl.LOCK_UN)
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr.decode()
    want = {**expected_changed(qwen_family), **expected_changed(llama_family)}
    assert changed_in(out) == want
    assert set(duplicates(out).values()) == {0}
    # one part per table per scan, and the atlas holds what its parts hold
    assert len(results.part_names("tensors")) == 2
    assert catalog.update(out) == {"scans": 0, "parts": 0, "rows": 0}


def _units(out: Path) -> list[int]:
    """n_units of each scan, in the order of its scans part's name."""
    import pyarrow.parquet as pq

    return [
        pq.read_table(p, columns=["n_units"])["n_units"][0].as_py()
        for p in sorted(out.glob("tables/scans/*.parquet"))
    ]
