"""The ``lab`` subcommand: build the lab's checkpoint families and print the sweep's path.

    rlvr-ray lab --out lab-out                 # default preset (~10 minutes on 2 CPU cores)
    rlvr-ray lab --out /tmp/lab --preset tiny  # seconds
    rlvr-ray lab --out lab-out --preset paper  # 512 wide x 8 blocks: on a GPU (--device auto)
    python -m rlvr_ray.lab --out lab-out       # the same without the main CLI

``add_parser(subparsers)`` registers the subcommand on an argparse subparsers object and sets
``func`` to ``run``. Flags left out take the preset's values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlvr_ray.lab.settings import PRESETS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lab`` on ``subparsers``; returns its parser (``func`` set to ``run``)."""
    d = PRESETS["default"]
    p = subparsers.add_parser(
        "lab",
        help="train small Qwen2/Llama/Mistral checkpoint families (base, RL and SFT runs)",
        description="Train the lab's checkpoint families (on CUDA when available, else on the "
        "CPU) and write a sweep YAML.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("lab-out"), help="output directory (default: ./lab-out)"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="size preset: default (~10 minutes on 2 cores), tiny (seconds) or paper (512 wide, "
        "8 blocks: for a GPU; hours on a CPU) (default: default)",
    )
    p.add_argument(
        "--archs",
        default=None,
        help=f"comma-separated architectures (default: {','.join(d.archs)})",
    )
    p.add_argument(
        "--hidden",
        type=int,
        default=None,
        help=f"model width in units, a multiple of 32 (default: the preset's; {d.hidden} in default)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"transformer blocks (default: the preset's; {d.layers} in default)",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help=f"maximum pretraining optimizer steps (default: the preset's; {d.pretrain_steps} in default)",
    )
    p.add_argument(
        "--rl-steps",
        type=int,
        default=None,
        help=f"rollout steps per RL run (default: the preset's; {d.rl_steps} in default)",
    )
    p.add_argument(
        "--sft-steps",
        type=int,
        default=None,
        help=f"optimizer steps of the SFT run (default: the preset's; {d.sft_steps} in default)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to train: cuda, cpu, or auto = cuda when torch sees a CUDA device; a CUDA "
        "build's bytes differ from a CPU build's and are cached apart (default: auto)",
    )
    p.add_argument("--seed", type=int, default=0, help="global seed (default: 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch CPU threads; part of the cache key (default: {d.threads})",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="families trained at once, one process each (default: CPU cores, at most one per "
        "architecture); the checkpoints do not depend on it",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when the manifest says this build exists (default: off)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the lab described by ``args``; prints the sweep path; returns the exit status."""
    from rlvr_ray.lab.build import build_lab

    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip()) if args.archs else None
    try:
        sweep = build_lab(
            args.out,
            preset=args.preset,
            archs=archs,
            hidden=args.hidden,
            layers=args.layers,
            pretrain_steps=args.pretrain_steps,
            rl_steps=args.rl_steps,
            sft_steps=args.sft_steps,
            seed=args.seed,
            threads=args.threads,
            force=args.force,
            jobs=args.jobs,
            device=args.device,
        )
    except ValueError as err:
        print(f"rlvr-ray lab: error: {err}", file=sys.stderr)
        return 2
    print(sweep)
    return 0
