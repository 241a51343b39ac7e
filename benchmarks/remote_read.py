"""Hub checkpoints read by HTTP range requests vs downloaded whole and then scanned, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/remote_read.py               # 4 layers, 2 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/remote_read.py --layers 2 --rounds 1   # quicker

Writes a base + 2 runs (bf16, 1-ULP updates on ~30% of weights) at Qwen2.5-1.5B shapes (hidden
1536, intermediate 8960, 12 heads, 2 KV heads, vocabulary 151936, q/k/v biases, tied embeddings:
no lm_head) with --layers layers instead of 28 (~0.84 GB a checkpoint at 4), publishes them on
the local Hub server of the tests (tests/hub/fake_hub.py, 127.0.0.1), and scans the group
(geometry off) on one local Ray with --workers actors, alternating in each round:
  range     hf:// refs: headers, then each actor's tensors by HTTP range requests
  download  hf://...?download (``--download``): the driver downloads each snapshot whole into an
            empty cache with huggingface_hub, then the actors read it from disk
For each: the time to the first finished unit (first result), the whole scan, the bytes the
server sent, and the bytes written to the download cache; then each ratio download / range,
as the median of the rounds' ratios. On the CPU, without a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

QWEN25_15B = (1536, 8960, 12, 2, 151936, True)
RUNS = ("grpo-a", "grpo-b")


def write_family(root: Path, layers: int) -> dict[str, Path]:
    from rlvr_ray.lab.planted import move_ulps, random_base, tensor_shapes, write_checkpoint

    rng = np.random.default_rng(0)
    shapes = tensor_shapes("qwen2", layers, QWEN25_15B)
    shapes.pop("lm_head.weight")  # tied to the embeddings, as in Qwen2.5-1.5B
    base = {k: random_base(s, rng) for k, s in shapes.items()}
    dirs = {"base": write_checkpoint(root / "base", base, "qwen2", layers)}
    for name in RUNS:
        run = {}
        for k, b in base.items():
            mask = rng.random(b.shape, dtype=np.float32) < 0.3
            run[k] = move_ulps(b, mask, np.where(mask, 1, 0).astype(np.int64))
        dirs[name] = write_checkpoint(root / name, run, "qwen2", layers)
    return dirs


def scan_once(hub, method: str, out: Path, workers: int) -> dict:
    from rlvr_ray.engine.config import sweep_from_dict
    from rlvr_ray.engine.driver import run_scan
    from rlvr_ray.hub import client

    opt = "?download" if method == "download" else ""
    data = {
        "groups": [
            {
                "name": "g",
                "base": f"hf://org/base{opt}",
                "runs": [{"name": r, "checkpoint": f"hf://lab/{r}{opt}"} for r in RUNS],
            }
        ],
        "params": {"geometry": False},
    }
    for repo in ("org/base", *(f"lab/{r}" for r in RUNS)):
        client.remove_download(repo)
    hub.served.clear()
    first: list[float] = []
    t0 = time.perf_counter()
    res = run_scan(
        sweep_from_dict(data, out.parent),
        str(out),
        workers=workers,
        progress="quiet",
        on_unit=lambda rep: first or first.append(time.perf_counter() - t0),
    )
    seconds = time.perf_counter() - t0
    if res.exit_code != 0:
        sys.exit(f"{method}: scan failed: {res.failures}")
    files = client.cache_dir().rglob("*")
    cache = sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
    return {
        "first_s": first[0],
        "scan_s": seconds,
        "served_mb": hub.bytes_served() / 1e6,
        "cache_mb": cache / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both methods (default: 2)")
    ap.add_argument("--workers", type=int, default=2, help="scan actors (default: 2)")
    ap.add_argument("--dir", help="working directory (default: a temporary one, removed)")
    args = ap.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="rlvr-remote-"))
    os.environ["RLVR_RAY_CACHE"] = str(root / "cache")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import ray
    from hub.fake_hub import FakeHub

    try:
        dirs = write_family(root / "ckpts", args.layers)
        size = sum(f.stat().st_size for d in dirs.values() for f in d.iterdir())
        print(f"base + {len(RUNS)} runs, {args.layers} layers: {size / 1e9:.2f} GB of files")
        hub = FakeHub().start()
        os.environ["HF_ENDPOINT"] = hub.url
        hub.publish("org/base", dirs["base"])
        for r in RUNS:
            hub.publish(f"lab/{r}", dirs[r])
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
        rows: dict[str, list[dict]] = {"range": [], "download": []}
        for i in range(args.rounds):
            for method in rows:  # interleaved: range, download, range, download, ...
                got = scan_once(hub, method, root / f"out-{method}-{i}", args.workers)
                rows[method].append(got)
                print(
                    f"round {i + 1} {method:8s} "
                    + "  ".join(f"{k} {v:8.2f}" for k, v in got.items())
                )
        print(f"\nmedians of {args.rounds} rounds (ratio: download / range, median of rounds)")
        print(f"{'':10s}{'first result s':>16s}{'scan s':>10s}{'served MB':>12s}{'cache MB':>10s}")
        for method, got in rows.items():
            m = {k: median(g[k] for g in got) for k in got[0]}
            print(
                f"{method:10s}{m['first_s']:16.2f}{m['scan_s']:10.2f}{m['served_mb']:12.1f}{m['cache_mb']:10.1f}"
            )
        ratio = {
            k: median(d[k] / r[k] for d, r in zip(rows["download"], rows["range"], strict=True))
            for k in ("first_s", "scan_s", "served_mb")
        }
        print(
            f"{'ratio':10s}{ratio['first_s']:16.2f}{ratio['scan_s']:10.2f}{ratio['served_mb']:12.3f}"
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
