"""Helpers of the cluster and fault tests: compare two results directories row for row."""

from __future__ import annotations

import math
import time

from rlvr_ray.io import catalog

#: table -> the key that must be unique within one scan
KEYS = {
    "tensors": "scan_id, run, tensor",
    "profiles": "scan_id, run, tensor, axis, idx",
    "consistency": "scan_id, tensor",
    "consensus_profiles": "scan_id, tensor, axis, idx",
    "maps": "scan_id, run, tensor, kind",
}


def _norm(v):
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, list):
        return tuple(_norm(x) for x in v)
    return v


def snapshot(out) -> dict[str, list[tuple]]:
    """Every row of the statistic tables, all columns, sorted."""
    con = catalog.connect(str(out))
    try:
        return {
            t: [
                tuple(_norm(v) for v in r)
                for r in con.execute(f"SELECT * FROM {t}_all ORDER BY ALL").fetchall()
            ]
            for t in KEYS
        }
    finally:
        con.close()


def duplicates(out) -> dict[str, int]:
    """table -> rows beyond one per key (0 everywhere when nothing was written twice)."""
    con = catalog.connect(str(out))
    try:
        return {
            t: con.execute(f"SELECT count(*) - count(DISTINCT ({k})) FROM {t}_all").fetchone()[0]
            for t, k in KEYS.items()
        }
    finally:
        con.close()


def assert_same_results(got, clean) -> None:
    a, b = snapshot(got), snapshot(clean)
    for t in KEYS:
        assert len(a[t]) == len(b[t]) > 0, (t, len(a[t]), len(b[t]))
        assert a[t] == b[t], t
    assert duplicates(got) == dict.fromkeys(KEYS, 0)


def sweep_dict(fam, group: str = "g", geometry: bool = False) -> dict:
    runs = [
        {"name": n, "checkpoint": str(p), "algorithm": n.split("-")[0]} for n, p in fam.runs.items()
    ]
    return {
        "groups": [{"name": group, "base": str(fam.base), "runs": runs}],
        "params": {"geometry": geometry},
    }


def expected_changed(fam) -> dict[tuple[str, str], int]:
    """(run, tensor) -> bitwise-changed count from the planted bit patterns (+0 == -0)."""
    base = fam.bits["base"]
    return {
        (r, k): int(((base[k] != b) & (((base[k] | b) & 0x7FFF) != 0)).sum())
        for r in fam.runs
        for k, b in fam.bits[r].items()
    }


def changed_in(out) -> dict[tuple[str, str], int]:
    con = catalog.connect(str(out))
    try:
        return {
            (r, t): n
            for r, t, n in con.execute("SELECT run, tensor, n_changed FROM tensors_all").fetchall()
        }
    finally:
        con.close()


def both_actors_up(rep: dict, seen: list) -> None:
    """on_unit: at the first report, wait for the second actor to be up. Units now take
    milliseconds, and the first actor could otherwise finish the scan before the second one
    has imported torch."""
    import ray
    from ray._private import state

    if not seen:
        deadline = time.monotonic() + 60
        while (
            sum(
                a["State"] == "ALIVE" and a["ActorClassName"].endswith("ScanActor")
                for a in state.actors().values()
            )
            < 2
        ):
            assert time.monotonic() < deadline, "the second actor never came up"
            time.sleep(0.05)
        assert ray.is_initialized()
    seen.append(rep)
