"""Planning a scan imports neither torch nor numba (only the actors do): a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PLAN = """
import json, sys
from rlvr_ray.engine import driver
from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.io.results import ResultsDir

base, run, out = sys.argv[1:4]
sweep = sweep_from_dict(
    {"groups": [{"name": "g", "base": base, "runs": [{"name": "r", "checkpoint": run}]}]}, ".", "t"
)
results = ResultsDir(out)
results.ensure()
result = driver.ScanResult(results.uri)
todo = driver._plan(sweep, results, result, False, 1 << 10, {})
heavy = sorted(m for m in ("torch", "numba", "ray") if m in sys.modules)
print(json.dumps({"units": len(todo), "errors": result.errors, "heavy": heavy}))
"""


def test_planning_a_sweep_imports_no_torch_numba_or_ray(qwen_family, tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    args = [str(qwen_family.base), str(qwen_family.runs["grpo-a"]), str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-c", PLAN, *args], env=env, capture_output=True, text=True, check=True
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["errors"] == [] and got["units"] >= 16  # tiny units: the plan is real
    assert got["heavy"] == []
