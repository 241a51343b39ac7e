"""Scan throughput and memory, side by side in one run, on real Qwen2-0.5B tensor shapes.

    .venv/bin/python benchmarks/scan_throughput.py --layers 4            # ~3.3 GB of checkpoints
    .venv/bin/python benchmarks/scan_throughput.py --layers 24 --keep    # the whole 0.5B model

Writes a base + 4 runs (bf16, planted 1-3 ULP updates on ~30% of weights) under --dir, then
measures, each in a fresh subprocess so peak RSS is its own:
  raw    a plain sequential read of every byte of the five checkpoints (page cache warm)
  scan   `run_scan` on an embedded Ray (mask + consistency statistics, no geometry)
  naive  load whole state dicts with safetensors.torch.load_file and compare tensor by tensor
  worker one ScanWorker in one process, every unit (peak RSS vs (runs + 1) x largest tensor)
and prints the ratios. Targets: scan >= 0.5x raw read; scan faster than naive, bounded memory.
Each is measured twice: page cache warm, and cold (the page cache dropped before each method,
as a scan of checkpoints on disk meets them; needs root, else the cold rows are left out).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNS = ("grpo-a", "grpo-b", "dapo", "ppo")


def write_family(root: Path, layers: int) -> None:
    from rlvr_ray.io.synth import QWEN2_05B, move_ulps, random_base, tensor_shapes, write_checkpoint

    rng = np.random.default_rng(0)
    shapes = tensor_shapes("qwen2", layers, QWEN2_05B)
    base = {k: random_base(s, rng) for k, s in shapes.items()}
    write_checkpoint(root / "base", base, "qwen2", layers)
    for name in RUNS:
        run = {}
        for k, b in base.items():
            mask = rng.random(b.shape, dtype=np.float32) < 0.3
            run[k] = move_ulps(
                b, mask, np.where(rng.random(b.shape, dtype=np.float32) < 0.5, -1, 1)
            )
        write_checkpoint(root / name, run, "qwen2", layers)


def files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.safetensors"))


def child_raw(root: Path) -> dict:
    buf = bytearray(64 << 20)
    n = 0
    t = time.perf_counter()
    for f in files(root):
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    return {"seconds": time.perf_counter() - t, "bytes": n}


def child_naive(root: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    t = time.perf_counter()
    base = load_file(str(root / "base" / "model.safetensors"))
    out = {}
    for name in RUNS:
        sd = load_file(str(root / name / "model.safetensors"))
        for k, w0 in base.items():
            m = sd[k].float() != w0.float()  # the obvious comparison (and not sign-of-zero safe)
            out[(name, k)] = (int(m.sum()), m.float().mean(-1), m.float().mean(0))
        del sd
    del torch
    return {"seconds": time.perf_counter() - t}


def child_scan(root: Path, out: Path, cpus: int) -> dict:
    from rlvr_ray.engine.config import sweep_from_dict
    from rlvr_ray.engine.driver import run_scan

    sweep = {"groups": [{"name": "qwen05b", "base": str(root / "base"),
                         "runs": [{"name": n, "checkpoint": str(root / n)} for n in RUNS]}],
             "params": {"geometry": False}}  # fmt: skip
    t = time.perf_counter()
    res = run_scan(sweep_from_dict(sweep, root), str(out), num_cpus=cpus, force=True, progress="quiet")  # fmt: skip
    return {"seconds": time.perf_counter() - t, "bytes": res.n_bytes, "errors": res.errors}


def child_worker(root: Path, out: Path) -> dict:
    from rlvr_ray.engine.config import Group, Params, Run
    from rlvr_ray.engine.plan import RunSpec, plan_group
    from rlvr_ray.engine.worker import ScanWorker
    from rlvr_ray.io.checkpoint import open_checkpoint

    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = open_checkpoint(str(root / "base"))
    runs = [(RunSpec(n, str(root / n), open_checkpoint(str(root / n)).fingerprint), open_checkpoint(str(root / n))) for n in RUNS]  # fmt: skip
    group = Group(name="w", base=str(root / "base"), runs=[Run(name=n, checkpoint=str(root / n)) for n in RUNS])  # fmt: skip
    plan = plan_group(group, base, runs, Params(geometry=False), 256 << 20)
    w = ScanWorker(str(out), threads=1)
    t = time.perf_counter()
    for u in plan.units:
        w.run_unit(u)
    largest = max(e.nbytes for e in base.entries.values())
    return {"seconds": time.perf_counter() - t, "idle_rss": idle, "largest": largest}


def drop_page_cache() -> bool:
    """Drop the kernel's page cache (root only) so the next read comes from the disk."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def run_child(kind: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--dir",
        str(args.dir),
        "--cpus",
        str(args.cpus),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (0.5B has 24; default 4)")  # fmt: skip
    ap.add_argument("--dir", type=Path, default=Path("bench-out/scan"), help="scratch directory")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for the embedded Ray (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ckpt, out = args.dir / "ckpt", args.dir / "results"
    if args.child:
        fn = {"raw": lambda: child_raw(ckpt), "naive": lambda: child_naive(ckpt),
              "scan": lambda: child_scan(ckpt, out, args.cpus), "worker": lambda: child_worker(ckpt, out / "w")}  # fmt: skip
        res = fn[args.child]()
        res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(res))
        return
    if not (ckpt / RUNS[-1] / "model.safetensors").exists():
        t = time.perf_counter()
        write_family(ckpt, args.layers)
        print(f"wrote base + {len(RUNS)} runs in {time.perf_counter() - t:.0f} s")
    total = sum(f.stat().st_size for f in files(ckpt))
    gb = total / 1e9
    print(f"\n{gb:.2f} GB in 5 checkpoints ({args.layers} layers of Qwen2-0.5B shapes), {args.cpus} CPUs")  # fmt: skip
    kinds = ("raw", "scan", "naive", "worker")
    run_child("raw", args)  # warm the page cache
    warm = {k: run_child(k, args) for k in kinds}
    cold = {}
    for k in kinds:
        if not drop_page_cache():
            break
        cold[k] = run_child(k, args)
    print(f"{'method':<8}{'cache':>6}{'seconds':>9}{'GB/s':>8}{'peak RSS GB':>13}")
    for label, res in (("warm", warm), ("cold", cold)):
        for name, r in res.items():
            print(f"{name:<8}{label:>6}{r['seconds']:>9.2f}{gb / r['seconds']:>8.2f}{r['peak_rss'] / 1e9:>13.2f}")  # fmt: skip
    for label, res in (("warm", warm), ("cold", cold)):
        if res:
            raw, scan, naive, worker = (res[k] for k in kinds)
            print(f"\n{label}: scan / raw read throughput {raw['seconds'] / scan['seconds']:.2f}x "
                  f"(target >= 0.5x); one worker / raw {raw['seconds'] / worker['seconds']:.2f}x; "
                  f"scan vs naive {naive['seconds'] / scan['seconds']:.2f}x faster; one worker vs "
                  f"naive {naive['seconds'] / worker['seconds']:.2f}x faster")  # fmt: skip
    worker, naive = warm["worker"], warm["naive"]
    bound = (len(RUNS) + 1) * worker["largest"]
    print(f"one worker, all units: peak RSS {worker['peak_rss'] / 1e9:.2f} GB "
          f"= {worker['idle_rss'] / 1e9:.2f} GB interpreter + {(worker['peak_rss'] - worker['idle_rss']) / 1e9:.2f} GB; "
          f"bound (runs + 1) x largest tensor = {bound / 1e9:.2f} GB")  # fmt: skip
    print(f"naive peak RSS / worker peak RSS: {naive['peak_rss'] / worker['peak_rss']:.1f}x")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
