"""End to end on one base + run pair: the `rlvr-ray scan` CLI against a plain load-and-compare.

    .venv/bin/python benchmarks/end_to_end.py                          # 0.5B and 1.5B, 2 rounds
    .venv/bin/python benchmarks/end_to_end.py --models 0.5b --repeat 3
    .venv/bin/python benchmarks/end_to_end.py --other /tmp/old-checkout   # also another code's CLI

Writes under --dir (a new temporary directory by default, deleted after) one base and one
RL-like run at Qwen2-0.5B and at Qwen2.5-1.5B shapes: a real ``transformers`` Qwen2Config
(tied embeddings, vocabulary 151936) and one bf16 safetensors file each, the run moving ~40% of
the entries by 1-3 bf16 ULPs (written with numpy: instantiating the models would take longer
than the benchmark). Then, round by round, each method in turn in a fresh process (A B A B):

  scan       `rlvr-ray scan --base B --run rl=R --out O --no-geometry` (a new O each time;
             a pair this small runs in-process: ``--executor auto``)
  scan_ray   the same on Ray's actors (``--executor ray``: an embedded Ray is started)
  scan_other the same CLI with PYTHONPATH=--other (another checkout, to compare code)
  naive      safetensors ``load_file`` of both checkpoints, then per tensor a bitwise compare
             and a count of changed entries (as sparsity_in_rl does)
  geometry   the scan with geometry (first round only, for information)

and reports wall time and the peak memory of the whole process tree (resident set summed over
the process and every descendant, Ray's processes included, sampled every 50 ms; psutil when
installed, else /proc). Ratios are per round (this machine's speed drifts with its neighbours),
and the table shows their medians. Each pair is read once before its first round, and the page
cache stays warm: every method reads the same files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# name -> (hidden, intermediate, layers, heads, kv heads); all tied, vocabulary 151936
MODELS = {"0.5b": (896, 4864, 24, 14, 2), "1.5b": (1536, 8960, 28, 12, 2)}
VOCAB = 151936
DENSITY = 0.4  # share of entries the run moves

NAIVE = """
import sys, torch
from safetensors.torch import load_file
base, run = load_file(sys.argv[1]), load_file(sys.argv[2])
changed = total = 0
for name, w0 in base.items():
    w1 = run[name]
    changed += int((w0.view(torch.int16) != w1.view(torch.int16)).sum())
    total += w0.numel()
print(changed, total)
"""


def write_pair(root: Path, model: str, seed: int = 0) -> tuple[Path, Path]:
    """A base and a run of ``model``'s shapes under ``root``; -> their directories."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from rlvr_ray.lab.planted import f32_to_bf16_bits, move_ulps, tensor_shapes

    hidden, inter, layers, heads, kv = MODELS[model]
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"],
    )
    shapes = tensor_shapes("qwen2", layers, (hidden, inter, heads, kv, VOCAB, True))
    shapes.pop("lm_head.weight")  # tied to the embedding
    rng = np.random.default_rng(seed)
    base, run = {}, {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32) * (0.02 if len(shape) == 2 else 0.1)
        bits = f32_to_bf16_bits(w + (1.0 if len(shape) == 1 else 0.0))
        mask = rng.random(shape, dtype=np.float32) < DENSITY
        steps = rng.integers(1, 4, size=shape, dtype=np.int8) * rng.choice(
            np.array([-1, 1], np.int8), size=shape
        )
        base[name] = bits
        run[name] = move_ulps(bits, mask, steps)
    dirs = []
    for which, tensors in (("base", base), ("rl", run)):
        path = root / f"{model}-{which}"
        path.mkdir(parents=True, exist_ok=True)
        config.to_json_file(path / "config.json")
        as_bf16 = {
            k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in tensors.items()
        }
        save_file(as_bf16, str(path / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(path)
    return dirs[0], dirs[1]


def read_through(files: list[Path]) -> None:
    """Read ``files`` once, whole (into the page cache; the bytes are dropped)."""
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _tree(root: int) -> dict[int, tuple[int, float]]:
    """pid -> (resident bytes, CPU seconds so far) of ``root`` and all its descendants."""
    try:
        import psutil
    except ImportError:
        psutil = None
    out = {}
    if psutil is not None:
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            return out
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                cpu = p.cpu_times()
                out[p.pid] = (p.memory_info().rss, cpu.user + cpu.system)
        return out
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            cpu[int(d)] = (int(fields[11]) + int(fields[12])) / hz
    todo, page = [root], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            out[pid] = (rss, cpu.get(pid, 0.0))
    return out


def measure(cmd: list[str], env: dict | None, cwd: Path) -> dict:
    """Run ``cmd`` in ``cwd`` (not a checkout: ``python -m`` imports from it); -> wall seconds,
    the process tree's peak resident bytes and its CPU seconds (each process's last sample:
    a process shorter than the sampling interval is missed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            tree = _tree(proc.pid)
            peak = max(peak, sum(rss for rss, _ in tree.values()))
            cpu.update({pid: c for pid, (_, c) in tree.items()})
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{out.decode()[-2000:]}")
    return {"seconds": wall, "peak_bytes": peak, "cpu_seconds": sum(cpu.values())}


def scan_cmd(base: Path, run: Path, out: Path, geometry: bool) -> list[str]:
    cli = [sys.executable, "-m", "rlvr_ray.cli", "scan", "--base", str(base)]
    cli += ["--run", f"rl={run}", "--out", str(out), "--progress", "quiet"]
    return cli + ([] if geometry else ["--no-geometry"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="0.5b,1.5b", help="comma-separated: 0.5b, 1.5b")
    ap.add_argument("--repeat", type=int, default=2, help="rounds (default: 2)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--other", type=Path, default=None, help="another checkout's root, to compare")
    ap.add_argument(
        "--geometry-models", default=None, help="models with a geometry row (default: all)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    ap.add_argument(
        "--pairs",
        type=Path,
        default=None,
        help="reuse the pairs written earlier under this directory (MODEL-base, MODEL-rl; "
        "written there, and kept, when missing)",
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlvr-e2e-", dir=args.dir))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    other_env = os.environ | {"PYTHONPATH": str(args.other)} if args.other else None
    rows: dict[str, dict[str, list[dict]]] = {}
    try:
        for model in args.models.split(","):
            t = time.perf_counter()
            kept = args.pairs is not None and (args.pairs / f"{model}-rl").exists()
            if kept:
                base, run = args.pairs / f"{model}-base", args.pairs / f"{model}-rl"
            else:
                base, run = write_pair(args.pairs or root, model)
            size = sum(
                f.stat().st_size for f in [*base.glob("*.safetensors"), *run.glob("*.safetensors")]
            )
            what = "reused" if kept else f"wrote in {time.perf_counter() - t:.0f} s:"
            print(f"{model}: {what} base + run, {size / 1e9:.2f} GB", flush=True)
            # into the page cache before round 1, so the method that runs first does not pay
            # for the disk alone (the earlier model's rounds may have pushed this pair out)
            read_through([*base.glob("*.safetensors"), *run.glob("*.safetensors")])
            rows[model] = got = {}
            methods = [("scan", env), ("scan_ray", env), ("naive", env)]
            if other_env:
                methods.insert(1, ("scan_other", other_env))
            for rnd in range(args.repeat):
                for method, menv in methods:
                    out = root / f"out-{model}-{method}-{rnd}"
                    if method == "naive":
                        cmd = [
                            sys.executable,
                            "-c",
                            NAIVE,
                            str(base / "model.safetensors"),
                            str(run / "model.safetensors"),
                        ]
                    else:
                        cmd = scan_cmd(base, run, out, geometry=False)
                        cmd += ["--executor", "ray"] if method == "scan_ray" else []
                    m = measure(cmd, menv, root)
                    got.setdefault(method, []).append(m)
                    shutil.rmtree(out, ignore_errors=True)
                    print(
                        f"  round {rnd + 1} {method:10s} {m['seconds']:7.2f} s  "
                        f"peak {m['peak_bytes'] / 2**30:6.2f} GiB  cpu {m['cpu_seconds']:6.1f} s",
                        flush=True,
                    )
            if model in (args.geometry_models or args.models).split(","):
                out = root / f"out-{model}-geometry"
                got["geometry"] = [measure(scan_cmd(base, run, out, geometry=True), env, root)]
                shutil.rmtree(out, ignore_errors=True)
                g = got["geometry"][0]
                print(
                    f"  geometry        {g['seconds']:7.2f} s  peak "
                    f"{g['peak_bytes'] / 2**30:6.2f} GiB  cpu {g['cpu_seconds']:6.1f} s"
                )
            if args.pairs is None:
                shutil.rmtree(base)
                shutil.rmtree(run)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nmodel  method       wall s  peak GiB  CPU s  naive / method, wall (per round)")
    for model, got in rows.items():
        for method, ms in got.items():
            ratio = "-"
            if method not in ("geometry", "naive"):
                per_round = [n["seconds"] / m["seconds"] for n, m in zip(got["naive"], ms)]
                ratio = f"{median(per_round):.2f}x ({', '.join(f'{r:.2f}' for r in per_round)})"
            wall = median(m["seconds"] for m in ms)
            peak = median(m["peak_bytes"] for m in ms) / 2**30
            cpu = median(m.get("cpu_seconds", float("nan")) for m in ms)
            print(f"{model:6s} {method:11s} {wall:7.2f} {peak:9.2f} {cpu:6.1f}  {ratio}")
    print("(medians over the rounds; the ratio is the median of each round's own ratio)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
