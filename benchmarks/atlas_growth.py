"""What adding one scan to the atlas costs as the atlas grows: the incremental update against a
whole rebuild, side by side in one run.

    .venv/bin/python benchmarks/atlas_growth.py                       # 1, 100, 1000 scans
    .venv/bin/python benchmarks/atlas_growth.py --sizes 1 100 1000 10000 --rebuild-max 1000

Scans a tiny planted qwen2 family once (a real scan on an embedded Ray, one CPU), then grows
an atlas to each size by cloning that scan's parts under new scan ids (and group names). At
each size it adds a further clone --repeat times with each method, alternating the order:
``update`` (what a scan does now: its own parts into the atlas) and ``rebuild`` (the atlas
built again from every part; skipped above --rebuild-max). Prints wall and CPU seconds of the
atlas step (the parts are written before the clock starts), the files under tables/, and the
ratio to the smallest atlas.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir, scan_key
from rlvr_ray.io.schema import ALL_TABLES
from rlvr_ray.lab.planted import planted_family


def template(root: Path) -> dict[str, list]:
    """One real scan's parts: table -> [(suffix of the part name, its rows)]."""
    fam = planted_family(root / "family", "qwen2", layers=2, seed=1, runs={"grpo": 0.3, "ppo": 0.4})
    runs = [{"name": n, "checkpoint": str(p), "algorithm": n} for n, p in fam.runs.items()]
    sweep = sweep_from_dict({"groups": [{"name": "g", "base": str(fam.base), "runs": runs}]}, root)
    out = root / "template"
    res = run_scan(sweep, str(out), num_cpus=1)
    assert res.exit_code == 0, res.errors
    results = ResultsDir(out)
    parts: dict[str, list] = {}
    for table, schema in ALL_TABLES.items():
        for name in results.part_names(table):
            path = results.path("tables", table, name)
            rows = pads.dataset([path], schema=schema).to_table()
            parts.setdefault(table, []).append((name.removeprefix(scan_key(name)), rows))
    return parts


def clone(results: ResultsDir, parts: dict[str, list]) -> str:
    """Write the template's parts once more under a new scan id (and group); -> the id."""
    scan_id = secrets.token_hex(8)
    for table, items in parts.items():
        for suffix, rows in items:
            for column, value in (("scan_id", scan_id), ("group_name", f"g{scan_id}")):
                i = rows.schema.get_field_index(column)
                rows = rows.set_column(i, column, pc.if_else(True, value, rows[column]))
            pq.write_table(rows, results.path("tables", table, scan_id + suffix))
    return scan_id


def timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1, 100, 1000],
        help="scans in the atlas (default: 1 100 1000)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="adds per method and size (default: 3)")
    ap.add_argument(
        "--rebuild-max",
        type=int,
        default=1000,
        help="largest atlas also timed with a whole rebuild (default: 1000)",
    )
    ap.add_argument("--dir", help="where everything goes (default: a temp dir, removed)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="rlvr-atlas-growth-"))
    try:
        parts = template(root)
        results = ResultsDir(root / "atlas")
        results.ensure()
        n = 0
        print(
            f"{'scans':>6} {'files':>7} {'method':>8} {'wall s':>7} {'cpu s':>7} "
            f"{'wall x smallest':>15}"
        )
        smallest: dict[str, float] = {}
        for size in sorted(args.sizes):
            new = [clone(results, parts) for _ in range(size - n)]
            n = size
            catalog.update(results, new)  # grow the atlas to this size
            files = sum(len(results.part_names(t)) for t in ALL_TABLES)
            methods = ["update", "rebuild"] if size <= args.rebuild_max else ["update"]
            times: dict[str, list] = {m: [] for m in methods}
            for r in range(args.repeat):
                for method in methods if r % 2 == 0 else methods[::-1]:
                    scan_id = clone(results, parts)
                    n += 1
                    if method == "update":
                        step = partial(catalog.update, results, [scan_id])
                    else:
                        step = partial(catalog.refresh, results)
                    times[method].append(timed(step))
            for method, got in times.items():
                wall = statistics.median(w for w, _ in got)
                cpu = statistics.median(c for _, c in got)
                smallest.setdefault(method, wall)
                print(
                    f"{size:>6} {files:>7} {method:>8} {wall:>7.3f} {cpu:>7.3f} "
                    f"{wall / smallest[method]:>15.2f}"
                )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
