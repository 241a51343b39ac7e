"""Scheduling: durations, the --every loop, the CLI and the Ray job entrypoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub.fake_hub import publish_family
from rlvr_ray.cli import main
from rlvr_ray.hub.watch import WatchConfig, parse_duration, watch_forever

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text,secs",
    [("30m", 1800), ("6h", 21600), ("1d", 86400), ("1h30m", 5400), ("90", 90), ("0.5h", 1800)],
)
def test_parse_duration(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize("bad", ["", "6x", "h", "-1h", "0m"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_every_runs_rounds_and_survives_a_broken_one(hub, family, wide, tmp_path):
    publish_family(hub, family, wide)
    hub.fail(r"GET /api/models/org/base$", 500, times=3)  # round 1: the base cannot be read
    sleeps, logs = [], []
    cfg = WatchConfig(
        ("org/base",), str(tmp_path / "out"), dry_run=True, retries=3, retry_wait=0.01
    )
    code = watch_forever(cfg, 3600, logs.append, rounds=2, sleep=sleeps.append)
    assert code == 0 and len(sleeps) == 1 and 3590 < sleeps[0] <= 3600
    assert any("base org/base not watched this round" in m for m in logs)
    assert sum("would scan" in m for m in logs) == 2  # round 2: q-grpo and q-dapo


def test_cli_bad_arguments(capsys):
    assert main(["watch", "--base", "org/base", "--every", "soon"]) == 2
    assert "duration 'soon'" in capsys.readouterr().err
    assert main(["watch", "--base", "org/base@main"]) == 2
    assert "without a revision" in capsys.readouterr().err


def test_job_entrypoint_dry_run(hub, family, wide, tmp_path):
    publish_family(hub, family, wide)
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/watch.py"),
            "--base",
            "org/base",
            "--out",
            str(tmp_path / "out"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "would scan lab/q-grpo@" in p.stdout and "would scan lab/q-dapo@" in p.stdout
