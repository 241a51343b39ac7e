"""Scan throughput and memory, side by side in one run, on real Qwen2-0.5B tensor shapes.

    .venv/bin/python benchmarks/scan_throughput.py --layers 2            # ~3.0 GB of checkpoints
    .venv/bin/python benchmarks/scan_throughput.py --layers 24 --keep    # the whole 0.5B model
    python benchmarks/scan_throughput.py --device cuda --kinds raw,worker,worker_cpu   # on a GPU

Writes a base + 4 runs (bf16, planted 1-3 ULP updates on ~30% of weights) under --dir, then
measures, each in a fresh subprocess so peak RSS is its own:
  raw          a plain sequential read of every byte of the five checkpoints (64 MiB reads)
  raw_1m       the same in 1 MiB reads, which stay in the caches: a page cache's best rate
  scan         `run_scan` on an embedded Ray (mask + consistency statistics, no geometry);
               reported end to end and for its units phase (first unit handed out to last
               one back: the streaming throughput, without Ray's and the actors' start-up)
  naive        load whole state dicts with safetensors.torch.load_file and compare
  worker       one ScanWorker in one process, every unit, on --device (peak RSS vs the bound
               (runs + 1) x largest tensor)
  worker_torch the same on the CPU with the fused kernels off (RLVR_RAY_KERNELS=torch)
  worker_cpu   the same on the CPU with the fused kernels (to set beside a --device cuda row)
and prints the ratios. Targets: scan >= 0.5x raw read; scan faster than naive, bounded memory.
Each is measured twice: page cache warm, and cold (the page cache dropped before each method,
as a scan of checkpoints on disk meets them; needs root, else the cold rows are left out).
--repeat N runs N rounds of every method in turn and prints medians, their range, and each ratio
as the median of its rounds' ratios (this machine's memory and disk speed drift with its
neighbours: a ratio is only fair within a round).
Nothing here needs Ray but the scan row (--kinds without it runs where Ray is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

RUNS = ("grpo-a", "grpo-b", "dapo", "ppo")


def write_family(root: Path, layers: int) -> None:
    from rlvr_ray.lab.planted import (
        QWEN2_05B,
        move_ulps,
        random_base,
        tensor_shapes,
        write_checkpoint,
    )

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


def peak_rss() -> int:
    """This process's peak resident set (bytes). VmHWM belongs to the process image, where
    ru_maxrss also carries the peak of the parent that forked it across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.safetensors"))


def child_raw(root: Path, bufsize: int = 64 << 20) -> dict:
    buf = bytearray(bufsize)
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


def child_scan(root: Path, out: Path, cpus: int, device: str) -> dict:
    from rlvr_ray.engine.config import sweep_from_dict
    from rlvr_ray.engine.driver import run_scan

    sweep = {
        "groups": [
            {
                "name": "qwen05b",
                "base": str(root / "base"),
                "runs": [{"name": n, "checkpoint": str(root / n)} for n in RUNS],
            }
        ],
        "params": {"geometry": False},
    }
    t = time.perf_counter()
    res = run_scan(
        sweep_from_dict(sweep, root), str(out), num_cpus=cpus, force=True, progress="quiet"
    )
    return {
        "seconds": time.perf_counter() - t,
        "bytes": res.n_bytes,
        "errors": res.errors,
        "unit_seconds": res.unit_seconds,
    }


def child_worker(root: Path, out: Path, device: str) -> dict:
    from rlvr_ray.engine.config import Group, Params, Run
    from rlvr_ray.engine.plan import RunSpec, plan_group
    from rlvr_ray.engine.worker import ScanWorker
    from rlvr_ray.io.checkpoint import open_checkpoint

    idle = peak_rss()
    base = open_checkpoint(str(root / "base"))
    runs = [
        (
            RunSpec(n, str(root / n), open_checkpoint(str(root / n)).fingerprint),
            open_checkpoint(str(root / n)),
        )
        for n in RUNS
    ]
    group = Group(
        name="w",
        base=str(root / "base"),
        runs=[Run(name=n, checkpoint=str(root / n)) for n in RUNS],
    )
    plan = plan_group(group, base, runs, Params(geometry=False), 256 << 20)
    w = ScanWorker(str(out), device=device, threads=1)
    t = time.perf_counter()
    for u in plan.units:
        w.run_unit(u)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
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


KINDS = ("raw", "raw_1m", "scan", "naive", "worker", "worker_torch", "worker_cpu")


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
        "--device",
        args.device,
    ]
    env = dict(os.environ)
    if kind == "worker_torch":
        env["RLVR_RAY_KERNELS"] = "torch"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res.get("errors"):
        raise SystemExit(f"{kind} failed: {res['errors']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--layers", type=int, default=2, help="transformer layers (0.5B has 24; default 2)"
    )
    ap.add_argument("--dir", type=Path, default=Path("bench-out/scan"), help="scratch directory")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for the embedded Ray (default 2)")
    ap.add_argument(
        "--device", default="cpu", help="device of the worker row: cpu or cuda (default cpu)"
    )
    ap.add_argument(
        "--kinds",
        default="raw,raw_1m,scan,naive,worker,worker_torch",
        help=f"comma-separated methods, of {','.join(KINDS)} (default: all but worker_cpu)",
    )
    ap.add_argument("--no-cold", action="store_true", help="skip the cold page cache rows")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every method; medians and their range are printed (default 1)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dir = args.dir.resolve()
    ckpt, out = args.dir / "ckpt", args.dir / "results"
    if args.child:
        fn = {
            "raw": lambda: child_raw(ckpt),
            "raw_1m": lambda: child_raw(ckpt, 1 << 20),
            "naive": lambda: child_naive(ckpt),
            "scan": lambda: child_scan(ckpt, out, args.cpus, args.device),
            "worker": lambda: child_worker(ckpt, out / "w", args.device),
            "worker_torch": lambda: child_worker(ckpt, out / "w", "cpu"),
            "worker_cpu": lambda: child_worker(ckpt, out / "w", "cpu"),
        }
        res = fn[args.child]()
        res["peak_rss"] = peak_rss()
        print(json.dumps(res))
        return
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: unknown {sorted(unknown)}; choose from {','.join(KINDS)}")
    if not (ckpt / RUNS[-1] / "model.safetensors").exists():
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import scan_throughput as s; from pathlib import Path; "
                f"s.write_family(Path({str(ckpt)!r}), {args.layers})",
            ],
            check=True,
        )
        print(f"wrote base + {len(RUNS)} runs in {time.perf_counter() - t:.0f} s")
    total = sum(f.stat().st_size for f in files(ckpt))
    gb = total / 1e9
    print(
        f"\n{gb:.2f} GB in 5 checkpoints ({args.layers} layers of Qwen2-0.5B shapes), "
        f"{args.cpus} CPUs for Ray, worker on {args.device}"
    )
    run_child("raw", args)  # warm the page cache
    # rounds of every method in turn: this machine's memory and disk speed drift with its
    # neighbours, so each ratio is taken within a round and the median round is reported
    warm = {k: [] for k in kinds}
    cold = {k: [] for k in kinds}
    for _ in range(args.repeat):
        for k in kinds:
            warm[k].append(run_child(k, args))
    for _ in range(0 if args.no_cold else args.repeat):
        for k in kinds:
            if not drop_page_cache():
                break
            cold[k].append(run_child(k, args))
    cold = {k: v for k, v in cold.items() if v}
    spread = args.repeat > 1
    print(
        f"{'method':<14}{'cache':>6}{'seconds':>9}{'GB/s':>8}{'peak RSS GB':>13}"
        + (f"{'range (s)':>16}" if spread else "")
    )

    def row(name, label, xs):
        m = median(xs)
        rng = f"{min(xs):>9.2f}-{max(xs):.2f}" if spread else ""
        return f"{name:<14}{label:>6}{m:>9.2f}{gb / m:>8.2f}", rng

    for label, res in (("warm", warm), ("cold", cold)):
        for name, rs in res.items():
            head, rng = row(name, label, [r["seconds"] for r in rs])
            print(f"{head}{median([r['peak_rss'] for r in rs]) / 1e9:>13.2f}{rng}")
            if name == "scan":
                head, rng = row("  units phase", label, [r["unit_seconds"] for r in rs])
                print(f"{head}{'':>13}{rng}")

    def ratio(res, a, b, ka="seconds", kb="seconds") -> str:
        """median over the rounds of res[a] / res[b], each round's pair taken together"""
        xs = [x[ka] / y[kb] for x, y in zip(res[a], res[b], strict=True)]
        rng = f" ({min(xs):.2f}-{max(xs):.2f} over {len(xs)} rounds)" if spread else ""
        return f"{median(xs):.2f}x{rng}"

    for label, res in (("warm", warm), ("cold", cold)):
        if not res or "raw" not in res:
            continue
        line = []
        if "scan" in res:
            line.append(
                f"scan units phase / raw read {ratio(res, 'raw', 'scan', kb='unit_seconds')} "
                f"(target >= 0.5x), end to end {ratio(res, 'raw', 'scan')}"
            )
            if "raw_1m" in res:
                line.append(
                    f"units phase / 1 MiB-read raw {ratio(res, 'raw_1m', 'scan', kb='unit_seconds')}"
                )
        for w in ("worker", "worker_cpu", "worker_torch"):
            if w in res:
                line.append(f"{w} / raw {ratio(res, 'raw', w)}")
        if "naive" in res:
            for k in ("scan", "worker"):
                if k in res:
                    line.append(f"{k} vs naive {ratio(res, 'naive', k)} faster")
        if "worker" in res and "worker_torch" in res:
            line.append(f"fused kernels vs torch path {ratio(res, 'worker_torch', 'worker')}")
        if "worker" in res and "worker_cpu" in res:
            line.append(f"{args.device} vs cpu worker {ratio(res, 'worker_cpu', 'worker')}")
        print(f"\n{label}: " + "; ".join(line))
    if "worker" in warm:
        worker = max(warm["worker"], key=lambda r: r["peak_rss"])
        bound = (len(RUNS) + 1) * worker["largest"]
        print(
            f"one worker, all units: peak RSS {worker['peak_rss'] / 1e9:.2f} GB "
            f"= {worker['idle_rss'] / 1e9:.2f} GB interpreter + {(worker['peak_rss'] - worker['idle_rss']) / 1e9:.2f} GB; "
            f"bound (runs + 1) x largest tensor = {bound / 1e9:.2f} GB"
        )
        if "naive" in warm:
            print(
                f"naive peak RSS / worker peak RSS: {ratio(warm, 'naive', 'worker', 'peak_rss', 'peak_rss')}"
            )
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
