"""Helpers of the remote-source tests: a sweep over refs, the tables of a scan without its ids,
and what each safetensors file of a directory holds (header and tensor-data byte counts)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from pathlib import Path

import pyarrow.parquet as pq

from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan

#: table -> the columns that key a row (one scan)
KEYS = {
    "tensors": ("run", "tensor"),
    "profiles": ("run", "tensor", "axis"),  # packed: one row per profile
    "consistency": ("tensor",),
    "consensus_profiles": ("tensor", "axis"),
    "maps": ("run", "tensor", "kind"),
}


UNIT_BYTES = 1 << 15


def sweep(base: str, runs: dict[str, str], out: Path):
    """The sweep of one group "g": base + ``runs`` (name -> ref), geometry off."""
    data = {
        "groups": [
            {
                "name": "g",
                "base": base,
                "runs": [
                    {"name": n, "checkpoint": r, "algorithm": "grpo"} for n, r in runs.items()
                ],
            }
        ],
        "params": {"geometry": False},
    }
    return sweep_from_dict(data, out.parent)


def scan(base: str, runs: dict[str, str], out: Path, **kw):
    """Scan base + ``runs`` (name -> ref) on the session's local Ray with 2 actors."""
    return run_scan(sweep(base, runs, out), str(out), workers=2, unit_bytes=UNIT_BYTES, **kw)


def tables(out: Path) -> dict[str, dict[tuple, dict]]:
    """table -> {key: row without its scan id}; every row of the scan."""
    got = {}
    for t, keys in KEYS.items():
        rows = pq.read_table(out / "tables" / t).to_pylist()
        got[t] = {
            tuple(r[k] for k in keys): {k: v for k, v in r.items() if k != "scan_id"} for r in rows
        }
        assert len(got[t]) == len(rows), t  # one row per key
    return got


def tensor_bytes(directory: Path) -> dict[str, int]:
    """tensor -> its data bytes, from the safetensors headers of ``directory``."""
    out = {}
    for p in sorted(directory.glob("*.safetensors")):
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                out[name] = t["data_offsets"][1] - t["data_offsets"][0]
    return out


def layout(directory: Path) -> dict[str, tuple[int, int]]:
    """safetensors file -> (bytes of its 8-byte length + header, bytes of its tensor data)."""
    out = {}
    for p in sorted(directory.glob("*.safetensors")):
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        out[p.name] = (8 + n, len(raw) - 8 - n)
    return out


def peer_pid(client_port: int, server_port: int) -> int | None:
    """The process on this machine that holds the TCP connection 127.0.0.1:``client_port`` ->
    127.0.0.1:``server_port`` (read from /proc: the socket's inode, then the process with a file
    descriptor on it); None if it is gone. How a local test server tells which process, hence
    which Ray node, each request came from, without trusting anything the client sends."""
    want_local, want_remote = f"0100007F:{client_port:04X}", f"0100007F:{server_port:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1] == want_local and cols[2] == want_remote:
                inode = cols[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # a process that ended, or one not ours
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return int(proc.name)
            except OSError:  # a descriptor closed since the listing: the others still count
                continue
    return None


BUCKET = "ckpts"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RLVR_RAY_FORWARD_AWS_CREDENTIALS": "1",
}


class Counting:
    """WSGI middleware: (key, first byte, body bytes, ranged) of every object GET in ``served``;
    with ``who`` (a function of the client's and the server's port), also in ``served_by`` with
    whom ``who`` says the request came from (first entry)."""

    def __init__(self, app, who=None):
        self.app, self.who, self.lock = app, who, threading.Lock()
        self.served: list[tuple[str, int, int, bool]] = []
        self.served_by: list[tuple[object, str, int, int, bool]] = []

    def __call__(self, environ, start_response):
        object_get = environ["REQUEST_METHOD"] == "GET" and environ.get("QUERY_STRING", "") == ""
        peer = None
        if object_get and self.who is not None:
            # asked as the request arrives, while the client surely holds its connection (after
            # the body is made, a client that gave up waiting on a loaded machine is gone)
            peer = self.who(int(environ["REMOTE_PORT"]), int(environ["SERVER_PORT"]))
        body = b"".join(self.app(environ, start_response))
        if object_get:
            rng = environ.get("HTTP_RANGE", "")
            first = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            entry = (environ["PATH_INFO"], first, len(body), bool(rng))
            with self.lock:
                self.served.append(entry)
                self.served_by.append((peer, *entry))
        return [body]


@contextlib.contextmanager
def environ_kept(names):
    """The variables ``names`` of os.environ as they were, again after the block."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def counting_s3(bucket: str, who=None):
    """A counting moto S3 server on 127.0.0.1 with ``bucket``; AWS_ENDPOINT_URL and test
    credentials set while it runs -> (boto3 client, the :class:`Counting` middleware)."""
    import boto3
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counting = Counting(DomainDispatcherApplication(create_backend_app), who)

    class Server(ThreadedMotoServer):
        def _server_entry(self):
            self._server = make_server(self._ip_address, self._port, counting, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    with environ_kept([*S3_ENV, "AWS_ENDPOINT_URL"]):
        os.environ.update(S3_ENV)
        server = Server(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        try:
            yield client, counting
        finally:
            server.stop()
