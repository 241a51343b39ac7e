"""Faults on a real local Ray (fast): an actor process killed mid-scan, a memory budget."""

from __future__ import annotations

import os
import signal
import time

import pyarrow as pa
import pytest
import ray
from faultlib import assert_same_results, changed_in, expected_changed, sweep_dict

from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import Placement, ScanResult, _open_group, over_budget, run_scan
from rlvr_ray.engine.plan import plan_group

UNIT_BYTES = 1 << 10  # tiny units: the scan has many of them (MIN_UNITS or more)


@pytest.fixture(scope="module")
def clean(qwen_family, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("clean") / "results"
    sweep = sweep_from_dict(sweep_dict(qwen_family), out.parent)
    res = run_scan(sweep, str(out), unit_bytes=UNIT_BYTES)
    assert res.exit_code == 0 and not res.retried
    return sweep, out, res


def test_clean_run_matches_the_planted_bits(clean, qwen_family):
    _, out, res = clean
    assert res.n_units >= 16
    assert changed_in(out) == expected_changed(qwen_family)
    assert {r["pid"] for r in res.units} and all(r["node_id"] for r in res.units)


def test_actor_process_killed_mid_scan_is_retried_with_identical_results(clean, tmp_path):
    sweep, clean_out, clean_res = clean
    killed = []

    def kill_third(rep: dict) -> None:
        # the actor that just reported holds its next unit: SIGKILL its process
        if len(killed) == 0 and rep["unit"] is not None and len(seen) == 2:
            os.kill(rep["pid"], signal.SIGKILL)
            killed.append((rep["pid"], time.time()))
        seen.append(rep["unit"])

    seen: list[int] = []
    out = tmp_path / "results"
    res = run_scan(sweep, str(out), unit_bytes=UNIT_BYTES, on_unit=kill_third)
    assert killed and res.retried, "the kill should have cost a unit"
    assert res.exit_code == 0 and not res.errors
    assert sorted(seen) == list(range(clean_res.n_units))  # each unit reported exactly once
    pid, when = killed[0]  # no unit started on the killed process after the kill
    assert all(r["started"] < when for r in res.units if r["pid"] == pid)
    assert_same_results(out, clean_out)


@pytest.mark.slow
def test_memory_budget_refuses_units_by_tensor_and_a_rerun_finishes(clean, qwen_family, tmp_path):
    sweep, clean_out, clean_res = clean
    # qwen2 tiny, no geometry: embed/lm_head [96, 32] bf16, 5 copies x 6144 B + a chunk's
    # scratch (128 B x 3072) + 4 runs' row and column vectors (64 B x 4 x 128) = 456704 B; the
    # MLP [64, 32]: 5 x 4096 + 128 x 2048 + 64 x 4 x 96 = 307200 B
    budget = 400_000 / 2**30
    out = tmp_path / "results"
    res = run_scan(sweep, str(out), unit_bytes=UNIT_BYTES, memory_gb=budget)
    refused = [e for e in res.errors if "refused" in e]
    assert len(refused) == 2 and res.exit_code == 3
    assert any(
        "tensor model.embed_tokens.weight needs 446.0 KiB (5 copies x 6.0 KiB + scratch)" in e
        for e in refused
    )
    assert any("tensor lm_head.weight needs 446.0 KiB" in e for e in refused)
    done = {t for _, t in changed_in(out)}
    assert "lm_head.weight" not in done and "model.layers.1.mlp.down_proj.weight" in done
    again = run_scan(sweep, str(out), unit_bytes=UNIT_BYTES)
    assert again.exit_code == 0 and again.n_units_resumed == clean_res.n_units - 2
    assert_same_results(out, clean_out)


def test_placement_asks_for_memory_spreads_and_forwards_store_settings(ray_local, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    p = Placement.for_cluster("s3://bucket/x", 100, None, None, 0.5)
    assert p.n_actors == 2  # 2 CPUs, no GPU
    assert p.options["memory"] == 2**29 and p.options["scheduling_strategy"] == "SPREAD"
    assert "num_gpus" not in p.options
    arrow = {"ARROW_DEFAULT_MEMORY_POOL": "system"}  # not mimalloc (see worker_env)
    assert p.options["runtime_env"] == {
        "env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", **arrow}
    }
    local = Placement.for_cluster("/tmp/x", 1, None, None, None)
    # the store's endpoint (never its secrets) goes to actors whatever the results directory:
    # their checkpoints may be s3:// ones
    endpoint = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert local.n_actors == 1 and local.options["runtime_env"] == {"env_vars": arrow | endpoint}
    # an actor started with these options allocates Arrow's buffers with malloc
    pool = ray.remote(lambda: pa.default_memory_pool().backend_name)
    assert ray.get(pool.options(**local.options).remote()) == "system"
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")  # a user's choice is kept
    assert Placement.for_cluster("/tmp/x", 1, None, None, None).options["runtime_env"] == {
        "env_vars": {"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"} | endpoint
    }


def test_over_budget_names_the_tensor_that_cannot_fit(qwen_family, tmp_path):
    sweep = sweep_from_dict(sweep_dict(qwen_family, geometry=True), tmp_path)
    base, runs = _open_group(sweep.groups[0], ScanResult(str(tmp_path)))
    plan = plan_group(sweep.groups[0], base, runs, sweep.params, UNIT_BYTES)
    # geometry on, 5 copies. embed/lm_head [96, 32] (no SVD): 5 x 6144 B + a chunk's scratch
    # (128 B x 3072) + 4 runs' row and column vectors (64 B x 4 x 128) = 456704 B; the next
    # largest, gate/up [64, 32] with an SVD: 5 x 4096 + 128 x 2048 + 64 x 4 x 96 + geometry
    # (32 B x 2048 + 64 B x 32^2) = 438272 B
    fit, refused = over_budget(list(plan.units), 450_000 / 2**30)
    assert len(refused) == 2 and len(fit) == len(plan.units) - 2
    assert (
        "tensor model.embed_tokens.weight needs 446.0 KiB (5 copies x 6.0 KiB + scratch)"
        in refused[0] + refused[1]
    )
    fit, refused = over_budget(list(plan.units), 456704 / 2**30)
    assert not refused and len(fit) == len(plan.units)


def test_memory_estimate_of_a_streamed_tensor_is_chunks_not_copies():
    from rlvr_ray.engine.config import Params
    from rlvr_ray.engine.memory import tensor_memory
    from rlvr_ray.engine.plan import TensorSpec

    one = 151936 * 896 * 2  # Qwen2-0.5B's bf16 embedding: 272 MB, no SVD by default
    emb = TensorSpec("model.embed_tokens.weight", "embed", None, None, 5 * one, (151936, 896))
    window = (1 << 22) // 896 * 896  # whole rows within STREAM_WINDOW_NUMEL
    scratch = 128 * (1 << 18) + 64 * 4 * (151936 + 896)  # a chunk; 4 runs' row/col vectors
    # two bf16 windows per copy + scratch
    assert tensor_memory(emb, 5, Params()) == 5 * 2 * 2 * window + scratch
    assert tensor_memory(emb, 5, Params()) < one
    opted_in = Params(svd_embeddings=True, max_svd_numel=1 << 30)  # now it gets an SVD: whole
    geometry = 32 * 151936 * 896 + 64 * 896 * 896
    assert tensor_memory(emb, 5, opted_in) == 5 * one + scratch + geometry


def test_a_unit_that_kills_every_actor_is_given_up_alone(clean, tmp_path, monkeypatch):
    """Actors hold two units at a time; a unit lost once runs alone afterwards, so a unit that
    kills every actor it meets is given up after MAX_ATTEMPTS runs, and every other unit,
    charged at most once for having shared an actor with it, is done exactly once."""
    from rlvr_ray.engine import cluster, pool
    from rlvr_ray.engine.actor import ScanActor

    sweep, _, clean_res = clean
    victim = 5

    class Poisoned(ScanActor):  # a local class: Ray ships it by value
        def run_unit(self, unit):
            if unit.index == victim:
                os._exit(1)  # the process dies, as under the OOM killer
            return super().run_unit(unit)

    monkeypatch.setattr(cluster, "actor_class", lambda: Poisoned)
    res = run_scan(sweep, str(tmp_path / "results"), unit_bytes=UNIT_BYTES)
    assert res.errors == [
        f"group g: unit {victim} failed {pool.MAX_ATTEMPTS} times; last: ActorDiedError"
    ]
    retried = [int(r.split("unit ")[1].split(":")[0]) for r in res.retried]
    assert retried.count(victim) == pool.MAX_ATTEMPTS - 1
    others = [u for u in retried if u != victim]
    assert len(others) == len(set(others)) <= pool.MAX_ATTEMPTS - 1  # one charge at most
    assert sorted(r["unit"] for r in res.units) == [
        u for u in range(clean_res.n_units) if u != victim
    ]
    assert res.exit_code != 0
