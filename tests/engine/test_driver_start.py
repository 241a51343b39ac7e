"""A scan into a new results directory starts its actors while it reads headers and plans; a
rerun with every unit done starts none."""

from __future__ import annotations

import time

from faultlib import sweep_dict

from rlvr_ray.engine import driver
from rlvr_ray.engine.config import sweep_from_dict


def live_scan_actors() -> int:
    from ray._private import state

    return sum(
        a["State"] != "DEAD" and a["ActorClassName"].endswith("ScanActor")
        for a in state.actors().values()
    )


def test_actors_start_while_planning_and_not_for_a_finished_scan(
    qwen_family, ray_local, tmp_path, monkeypatch
):
    plan = driver._plan
    seen: list[int] = []

    def slow_plan(*args):  # as planning over a slow file system: wait for actors to show up
        deadline = time.monotonic() + 20  # (both: they start side by side, not at one instant)
        while live_scan_actors() < 2 and time.monotonic() < deadline and not seen:
            time.sleep(0.05)
        seen.append(live_scan_actors())
        return plan(*args)

    monkeypatch.setattr(driver, "_plan", slow_plan)
    sweep = sweep_from_dict(sweep_dict(qwen_family), tmp_path)
    out = str(tmp_path / "results")
    first = driver.run_scan(sweep, out, unit_bytes=1 << 10)
    assert first.exit_code == 0 and first.n_units >= 16
    assert seen[0] == 2  # both actors (2 CPUs) were created before the plan was done
    deadline = time.monotonic() + 20
    while live_scan_actors() and time.monotonic() < deadline:  # killed: Ray records it soon
        time.sleep(0.05)
    seen.append(-1)  # the rerun's planning does not wait
    again = driver.run_scan(sweep, out, unit_bytes=1 << 10)
    assert again.n_units_resumed == first.n_units and not again.units
    assert seen[2] == 0  # every unit is done: no actor


# an embedded Ray started as a scan starts it: its actors need no runtime_env to get the
# worker environment (Arrow's allocator), and the driver's own environment is left as it was
EMBEDDED = """
import json, os, sys
import pyarrow as pa
import ray
from rlvr_ray.engine import driver
started, pool = driver._start_pool(sys.argv[1], 1, None, 1, None, None, None, [])
probe = ray.remote(num_cpus=0)(lambda: pa.default_memory_pool().backend_name)
print(json.dumps({"started": started, "options": sorted(pool.options),
                  "actor_pool": ray.get(probe.remote()),
                  "driver_env": os.environ.get("ARROW_DEFAULT_MEMORY_POOL")}))
pool.shutdown()
ray.shutdown()
"""


def test_an_embedded_rays_actors_get_the_worker_env_without_a_runtime_env(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ARROW_"))}
    env |= {"HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", EMBEDDED, str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "started": True,
        "options": ["num_cpus", "scheduling_strategy"],
        "actor_pool": "system",
        "driver_env": None,
    }
