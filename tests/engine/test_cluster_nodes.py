"""Multi-node Ray on one machine (ray.cluster_utils.Cluster): GPU-aware spread, a node killed.

The head has no CPUs; two worker nodes have 1 CPU and 1 GPU each (declared: Ray places by
resources, the worker falls back to the CPU), so the driver starts one actor per GPU, one per
node. Killing a node mid-scan must cost nothing but time.
"""

from __future__ import annotations

import time

import pytest
from faultlib import (
    assert_same_results,
    both_actors_up,
    changed_in,
    expected_changed,
    sweep_dict,
)

from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan

pytestmark = pytest.mark.slow
UNIT_BYTES = 1 << 10


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:  # a session-wide local Ray from another module: park it, restore it after
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        if was_up:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")


@pytest.fixture(scope="module")
def clean(cluster, qwen_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "results"
    sweep = sweep_from_dict(sweep_dict(qwen_family), out.parent)
    seen: list = []
    res = run_scan(
        sweep, str(out), unit_bytes=UNIT_BYTES, on_unit=lambda r: both_actors_up(r, seen)
    )
    return sweep, out, res


def test_units_spread_over_both_worker_nodes_one_actor_per_gpu(cluster, clean, qwen_family):
    c, workers = cluster
    _, out, res = clean
    assert res.exit_code == 0 and not res.retried
    nodes = {r["node_id"] for r in res.units}
    assert nodes == {w.node_id for w in workers}  # both workers, never the CPU-less head
    assert len({r["pid"] for r in res.units}) == 2
    assert changed_in(out) == expected_changed(qwen_family)


def test_worker_node_killed_mid_scan_gives_identical_results(cluster, clean, tmp_path):
    import ray

    c, workers = cluster
    sweep, clean_out, clean_res = clean
    by_id = {w.node_id: w for w in workers}
    removed = []

    def kill_node(rep: dict) -> None:
        if not removed and len(reports) == 2:  # the node of the actor that just reported
            removed.append(rep["node_id"])
            c.remove_node(by_id[rep["node_id"]], allow_graceful=False)
            # units now take milliseconds: wait for Ray to see the node gone, or its actor
            # could finish the whole scan before anyone notices
            deadline = time.monotonic() + 60
            while any(n["NodeID"] == rep["node_id"] and n["Alive"] for n in ray.nodes()):
                assert time.monotonic() < deadline, "Ray never saw the node go"
                time.sleep(0.1)
        reports.append(rep)

    reports: list[dict] = []
    out = tmp_path / "results"
    res = run_scan(sweep, str(out), unit_bytes=UNIT_BYTES, on_unit=kill_node)
    assert removed and res.retried and res.exit_code == 0 and not res.errors
    assert sorted(r["unit"] for r in res.units) == list(range(clean_res.n_units))
    # survivors carry on after the removal (the removed node's actor may still finish a unit or
    # two while Ray tears it down: fixed part names make those harmless)
    assert any(r["node_id"] not in removed for r in res.units[3:])
    assert {r["node_id"] for r in res.units} <= set(by_id)
    assert_same_results(out, clean_out)
