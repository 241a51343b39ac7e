"""cluster/ files: the launcher YAML passes Ray's own schema; the KubeRay manifests say what the
README promises (GPU workers, token auth, jobs/sweep.py to s3://); jobs/sweep.py's arguments."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_launcher_yaml_passes_rays_schema():
    import jsonschema
    import ray

    schema = json.loads(
        (Path(os.path.dirname(ray.__file__)) / "autoscaler/ray-schema.json").read_text()
    )
    cfg = yaml.safe_load((REPO / "cluster/aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("pip install" in c and "rlvr-ray" in c for c in cfg["setup_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_kuberay_manifests_have_gpu_workers_token_auth_and_the_sweep_job():
    cluster = yaml.safe_load((REPO / "cluster/k8s/raycluster.yaml").read_text())
    job = yaml.safe_load((REPO / "cluster/k8s/rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token"}
        (gpu,) = spec["workerGroupSpecs"]
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    assert (
        "jobs/sweep.py" in job["spec"]["entrypoint"] and "--out s3://" in job["spec"]["entrypoint"]
    )


def test_sweep_job_defaults_to_log_progress_and_passes_scan_flags():
    job_argv = runpy.run_path(str(REPO / "jobs/sweep.py"))["job_argv"]
    assert job_argv(["s.yaml", "--out", "s3://b/p"]) == [
        "scan",
        "s.yaml",
        "--out",
        "s3://b/p",
        "--progress",
        "log",
    ]
    assert job_argv(["s.yaml", "--progress=quiet"]) == ["scan", "s.yaml", "--progress=quiet"]


def test_a_refused_join_says_how_to_turn_token_authentication_on(monkeypatch):
    from rlvr_ray.engine.cluster import _join_failed

    refused = "Failed to connect to Ray cluster at 10.0.0.5:6379\nDetails: InvalidAuthToken"
    hint = (
        "; a cluster started with token authentication (Ray 2.60's default) refuses a client "
        "without it: set RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token)"
    )
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert _join_failed(refused) == "Failed to connect to Ray cluster at 10.0.0.5:6379" + hint
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # on already: the first line alone
    assert _join_failed(refused) == "Failed to connect to Ray cluster at 10.0.0.5:6379"
