"""`ray job submit` end to end: a head started with `ray start` (token auth on), jobs/sweep.py.

The head is started with ``--block`` in its own process group and stopped by that id (not
``ray stop``, which would stop every Ray on a machine shared with other sessions).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from faultlib import changed_in, expected_changed, sweep_dict

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local head node (2 CPUs) with token authentication; -> its dashboard URL."""
    port, dash = _free_port(), _free_port()
    # every port explicit: other Ray heads on this machine hold the defaults (52365, 10001, ...)
    more = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp_path_factory.mktemp("head") / "ray-start.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
            *more,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        yield url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: stopping it stops the head's processes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _ray(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _wait_ready(url: str, env: dict, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while (r := _ray(env, "job", "list", "--address", url, timeout=60)).returncode != 0:
        assert time.monotonic() < deadline, r.stderr[-2000:]
        time.sleep(2)


def test_job_submit_runs_a_sweep_end_to_end(head, qwen_family, tmp_path):
    url, env = head
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(sweep_dict(qwen_family, group="qwen")))
    out = tmp_path / "results"
    _wait_ready(url, env)
    # the documented command, run from the repository root; it follows the logs to the end
    cmd = [
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        ".",
        "--submission-id",
        "rlvr-test-sweep",
        "--",
        "python",
        "jobs/sweep.py",
        str(sweep),
        "--out",
        str(out),
        "--workers",
        "2",
        "--unit-mb",
        "1",
    ]
    deadline = time.monotonic() + 90
    while "No available agent" in (r := _ray(env, *cmd)).stderr:  # the agent starts last
        assert time.monotonic() < deadline, r.stderr[-2000:]
        time.sleep(3)
    logs = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in logs, logs[-3000:]
    assert "tensors " in logs and re.search(r" [kMG]?B/s  ETA ", logs)  # log-mode progress lines
    assert "scanned " in logs and "(0 already done)" in logs
    assert changed_in(out) == expected_changed(qwen_family)
    status = _ray(env, "job", "status", "--address", url, "rlvr-test-sweep", timeout=60)
    assert "Job 'rlvr-test-sweep' succeeded" in status.stdout
