"""Helpers of the remote-source tests: a sweep over refs, the tables of a scan without its ids,
and what each safetensors file of a directory holds (header and tensor-data byte counts)."""

from __future__ import annotations

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


def scan(base: str, runs: dict[str, str], out: Path, **kw):
    """Scan base + ``runs`` (name -> ref) on the session's local Ray with 2 actors."""
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
    return run_scan(
        sweep_from_dict(data, out.parent), str(out), workers=2, unit_bytes=1 << 15, **kw
    )


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


def layout(directory: Path) -> dict[str, tuple[int, int]]:
    """safetensors file -> (bytes of its 8-byte length + header, bytes of its tensor data)."""
    out = {}
    for p in sorted(directory.glob("*.safetensors")):
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        out[p.name] = (8 + n, len(raw) - 8 - n)
    return out
