"""Helpers of the remote-source tests: a sweep over refs, the tables of a scan without its ids,
and what each safetensors file of a directory holds (header and tensor-data byte counts)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pyarrow.parquet as pq

from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan

#: table -> the columns that key a row (one scan)
KEYS = {
    "tensors": ("run", "tensor"),
    "profiles": ("run", "tensor", "axis", "idx"),
    "consistency": ("tensor",),
    "consensus_profiles": ("tensor", "axis", "idx"),
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
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(proc.name)
        except OSError:  # a process that ended, or one not ours
            continue
    return None
