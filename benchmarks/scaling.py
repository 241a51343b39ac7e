"""How a scan scales from 1 to 2 workers on this machine, both timings side by side in one run.

    .venv/bin/python benchmarks/scaling.py                    # 6 layers, 4 runs, ~0.45 GB read
    .venv/bin/python benchmarks/scaling.py --layers 12 --geometry --workers 1 2 4

Writes a planted qwen2-like family (hidden 512, intermediate 1536, vocab 8192: big enough that
one worker takes ~10-30 s on a laptop CPU) under --dir, starts one embedded Ray with
--num-cpus CPUs, and scans the same sweep into a fresh results directory per worker count
(alternating the order over --repeat rounds, so page cache and warm-up favour neither). Prints
wall time of the scan, GB/s, speedup over 1 worker, and the actors' busy time: when
busy / (wall x workers) stays high while the speedup falls short, the workers are waiting on
something shared (cores, memory bandwidth, the driver's catalog refresh at the end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from rlvr_ray.engine.config import load_sweep
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.lab.planted import planted_family

DIMS = (512, 1536, 8, 2, 8192, True)  # hidden, intermediate, heads, kv heads, vocab, qkv bias
RUNS = {"grpo-a": 0.3, "grpo-b": 0.3, "dapo": 0.4, "sft": 0.9}


def build(root: Path, layers: int, geometry: bool) -> Path:
    fam = planted_family(root / "family", "qwen2", layers=layers, runs=RUNS, dims=DIMS, seed=3)
    runs = [
        {"name": n, "checkpoint": str(p), "algorithm": n.split("-")[0]} for n, p in fam.runs.items()
    ]
    sweep = root / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "groups": [{"name": "bench", "base": str(fam.base), "runs": runs}],
                "params": {"geometry": geometry},
            }
        )
    )
    return sweep


def one(sweep_path: Path, root: Path, workers: int, tag: str, unit_mb: int) -> dict:
    out = root / f"out-{tag}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_scan(load_sweep(sweep_path), str(out), workers=workers, unit_bytes=unit_mb << 20)
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, res.errors
    busy = sum(u["seconds"] for u in res.units)
    return {
        "workers": workers,
        "wall": wall,
        "gb": res.n_bytes / 1e9,
        "busy": busy,
        "units": res.n_units,
        "nodes": len({u["node_id"] for u in res.units}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6, help="decoder layers (default: 6)")
    ap.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)"
    )
    ap.add_argument(
        "--num-cpus",
        type=int,
        default=os.cpu_count(),
        help="CPUs of the embedded Ray (default: all)",
    )
    ap.add_argument("--unit-mb", type=int, default=32, help="work unit size, MiB (default: 32)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, order alternating (default: 1)")
    ap.add_argument("--geometry", action="store_true", help="also SVD-based statistics")
    ap.add_argument("--dir", help="where the family and results go (default: a temp dir, removed)")
    args = ap.parse_args()

    import ray

    root = Path(args.dir or tempfile.mkdtemp(prefix="rlvr-scaling-"))
    try:
        sweep = build(root, args.layers, args.geometry)
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR"
        )  # a new Ray, even if `ray start` left one here
        print(
            f"cpus {os.cpu_count()} (Ray: {args.num_cpus}), load average at start "
            f"{os.getloadavg()[0]:.1f}, layers {args.layers}, geometry {args.geometry}"
        )
        rows = []
        for r in range(args.repeat):
            order = args.workers if r % 2 == 0 else args.workers[::-1]
            rows += [one(sweep, root, w, f"r{r}", args.unit_mb) for w in order]
        best = {w: min(x["wall"] for x in rows if x["workers"] == w) for w in args.workers}
        base = best[args.workers[0]]
        print(
            f"{'workers':>7} {'wall s':>7} {'GB':>6} {'GB/s':>6} {'speedup':>7} {'busy s':>7} "
            f"{'busy/(wall*w)':>13} {'units':>5}"
        )
        for x in rows:
            print(
                f"{x['workers']:>7} {x['wall']:>7.1f} {x['gb']:>6.2f} {x['gb'] / x['wall']:>6.3f} "
                f"{base / x['wall']:>7.2f} {x['busy']:>7.1f} "
                f"{x['busy'] / (x['wall'] * x['workers']):>13.2f} {x['units']:>5}"
            )
        if len(args.workers) > 1:
            w0, w1 = args.workers[0], args.workers[-1]
            print(
                f"scaling {w0} -> {w1} workers (best of {args.repeat}): "
                f"{best[w0]:.1f} s -> {best[w1]:.1f} s, ratio {best[w0] / best[w1]:.2f}x"
            )
    finally:
        ray.shutdown()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
