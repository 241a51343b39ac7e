"""``rlvr-ray demo``: build the lab's checkpoint families (cached), scan them, print the story.

    rlvr-ray demo --out demo-out            # lab families (needs the `lab` extra: transformers)
    rlvr-ray demo --out demo-out --planted  # planted synthetic families, no training stack

Everything runs locally: an embedded Ray, a local results directory, checkpoints written here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _planted_sweep(root: Path) -> Path:
    import yaml

    from rlvr_ray.io.synth import planted_family

    groups = []
    for i, mt in enumerate(["qwen2", "llama", "mistral"]):
        runs = {"grpo-s1": 0.3, "grpo-s2": 0.3, "dapo": 0.35, "sft": 0.97}
        fam = planted_family(root / mt, mt, layers=4, runs=runs, seed=i)
        groups.append({"name": f"{mt}-planted", "base": str(fam.base), "runs": [
            {"name": n, "checkpoint": str(p), "algorithm": n.split("-")[0],
             "consistency": not n.startswith("sft")} for n, p in fam.runs.items()]})  # fmt: skip
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def run(args: argparse.Namespace) -> int:
    from rlvr_ray.cli import main

    out = Path(args.out)
    if args.planted:
        sweep = _planted_sweep(out / "checkpoints")
    else:
        try:
            from rlvr_ray.lab.build import build_lab
        except ImportError as e:
            print(f"rlvr-ray: the lab needs the `lab` extra ({e}); try --planted", file=sys.stderr)
            return 2
        print(f"building the lab families in {out / 'lab'} (cached after the first run) ...")
        sweep = build_lab(out / "lab", preset=args.preset)
    argv = ["scan", str(sweep), "--out", str(out / "results")]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    code = main(argv)
    print(f'\nquery it:  rlvr-ray sql "SELECT * FROM run_sparsity" --out {out / "results"}')
    print(f"open it:   duckdb {out / 'results' / 'atlas.duckdb'}")
    return code


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="build demo checkpoints, scan them on an embedded Ray, print the headline")  # fmt: skip
    p.add_argument("--out", default="demo-out", help="where checkpoints and results go (default: demo-out)")  # fmt: skip
    p.add_argument("--planted", action="store_true", help="planted synthetic families instead of the trained lab")  # fmt: skip
    p.add_argument("--preset", default="default", help="lab preset: default or tiny (default: default)")  # fmt: skip
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    p.set_defaults(func=run)
