"""The embedded Ray of a scan without --address, started for real in a child process.

Every socket its processes listen on (read from /proc, as the kernel sees them) is on the
loopback interface, token authentication is on, and the token file it makes is mode 0600; a
token file the user already has that others can read gets a one-line warning.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc")

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

# starts the embedded Ray, an actor as the scan starts them, prints what the test needs and
# waits for a line on stdin before it stops Ray (the test reads the sockets meanwhile)
CHILD = """
import json, os, sys
os.umask(0o022)
import ray
from rlvr_ray.engine.driver import _init_ray, worker_env
warnings = []
assert _init_ray(None, 1, warnings)

@ray.remote(num_cpus=1, runtime_env={"env_vars": worker_env()})
class Probe:
    def pid(self):
        return os.getpid()

pid = ray.get(Probe.remote().pid.remote())
print(json.dumps({"warnings": warnings, "actor": pid}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def _env(home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"HOME": str(home), "RLVR_RAY_KEEP_RAY": "0"}


def _descendants(pid: int) -> list[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found = [pid]
    for p in found:
        found += [c for c, pp in parent.items() if pp == p]
    return found


def _address(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr.split(":")[0])
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening(pid: int) -> dict[int, list[str]]:
    """pid of ``pid`` or any descendant -> the local addresses its TCP sockets listen on and
    its bound UDP sockets."""
    owner = {}
    for p in _descendants(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = p
    got: dict[int, list[str]] = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if table.startswith("tcp") and cols[3] != "0A":  # 0A: LISTEN
                    continue
                if cols[9] in owner:
                    got.setdefault(owner[cols[9]], []).append(_address(cols[1]))
    return got


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_embedded_ray_listens_on_loopback_only_with_a_private_token(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=_env(home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line, "the child process ended before Ray was up"
        report = json.loads(line)
        sockets = listening(child.pid)
        names = {p: _cmdline(p) for p in sockets}
    finally:
        child.communicate("\n", timeout=120)
    exposed = {names[p][:120]: a for p, a in sockets.items() if set(a) - LOOPBACK}
    assert exposed == {}
    # the check saw every service: GCS, raylet, agents, the driver and the actor
    seen = " ".join(names.values())
    for service in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"):
        assert service in seen, service
    # (the driver's and the actor's own listeners come and go with their gRPC servers: where
    # they are seen they are checked above, but their absence at the moment of the look is no
    # failure)
    token = home / ".ray" / "auth_token"
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    assert len(token.read_text()) == 64 and int(token.read_text(), 16) >= 0
    assert oct((home / ".ray").stat().st_mode & 0o777) == "0o700"
    assert report["warnings"] == []
    assert child.returncode == 0


@pytest.mark.slow
def test_scan_warns_of_a_token_file_others_can_read(qwen_family, tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("ab" * 32)
    token.chmod(0o644)
    run = [f"--run={n}={p}" for n, p in list(qwen_family.runs.items())[:1]]
    cmd = [
        sys.executable,
        "-m",
        "rlvr_ray.cli",
        "scan",
        "--base",
        str(qwen_family.base),
        *run,
        "--out",
        str(tmp_path / "out"),
        "--num-cpus",
        "1",
        "--no-geometry",
        "--executor",
        "ray",  # a pair this small would run in-process, without an embedded Ray
    ]
    proc = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warning = (
        f"rlvr-ray: the Ray token file {token} is readable by group or others (mode 0644); "
        f"anyone who reads it can run code on this Ray: chmod 600 {token}"
    )
    assert warning in proc.stderr.splitlines()
    assert oct(token.stat().st_mode & 0o777) == "0o644"  # the user's file is left as it is
