"""Session fixtures: tiny real checkpoint families and one shared local Ray."""

from __future__ import annotations

import os

import pytest

from rlvr_ray.lab.planted import planted_family


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory):
    """qwen2-shaped, sharded (2 shards + index), base + 4 runs with planted ULP updates."""
    root = tmp_path_factory.mktemp("qwen2")
    return planted_family(
        root,
        "qwen2",
        layers=2,
        shards=2,
        seed=1,
        runs={"grpo-a": 0.2, "grpo-b": 0.25, "dapo": 0.3, "sft": 0.9},
    )


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return planted_family(root, "llama", layers=3, seed=2, runs={"grpo": 0.3, "ppo": 0.35})


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (2 CPUs); reused by every run_scan call."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
    yield ray
    if os.environ.get("RLVR_RAY_KEEP_RAY") != "1":
        ray.shutdown()
