"""``rlvr-ray demo``: build the lab's checkpoint families (cached), scan them, print the story.

    rlvr-ray demo --out demo-out            # lab families (needs the `lab` extra: transformers)
    rlvr-ray demo --out demo-out --planted  # planted synthetic families, no training stack

Everything runs locally: the scan runs in-process (a small one) or on an embedded Ray, into a
local results directory, from checkpoints written here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from rlvr_ray.stats.rank_rule import RANK_FRAC


def _planted_sweep(root: Path) -> Path:
    import yaml

    from rlvr_ray.lab.planted import planted_family

    groups = []
    for i, mt in enumerate(["qwen2", "llama", "mistral"]):
        runs = {"grpo-s1": 0.3, "grpo-s2": 0.3, "dapo": 0.35, "sft": 0.97}
        fam = planted_family(root / mt, mt, layers=4, runs=runs, seed=i)
        groups.append(
            {
                "name": f"{mt}-planted",
                # relative to the sweep file, which is where a sweep's paths are resolved from
                "base": os.path.relpath(fam.base, root),
                "runs": [
                    {
                        "name": n,
                        "checkpoint": os.path.relpath(p, root),
                        "algorithm": n.split("-")[0],
                        "consistency": not n.startswith("sft"),
                    }
                    for n, p in fam.runs.items()
                ],
            }
        )
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


HEADLINE = [
    (
        "RL vs SFT, final checkpoints: sparsity (share of bf16 weights bitwise unchanged), share of "
        "changes that moved 1 ULP, update overlap with principal / low-magnitude weights (random "
        f"baseline 0.5 each; k = {RANK_FRAC} of each matrix's short side; matrices whose geometry_status "
        "is not 'ok' left out), median NSS and median max principal angle (rad)",
        """
     SELECT group_name, algorithm, count(*) AS runs, round(avg(sparsity), 3) AS sparsity,
            round(avg(ulp1_share), 3) AS ulp1_share, round(avg(overlap_princ), 3) AS overlap_princ,
            round(avg(overlap_low), 3) AS overlap_low, avg(median_nss) AS nss,
            avg(median_max_angle) AS max_angle
     FROM summary_final GROUP BY group_name, algorithm
     ORDER BY group_name, algorithm = 'sft', algorithm""",
    ),
    (
        "Cross-run consistency of the RL runs' update masks: mean pairwise Jaccard vs the "
        "independent-Bernoulli baseline",
        """
     SELECT group_name, n_runs, round(mean_jaccard, 3) AS mean_jaccard,
            round(jaccard_baseline, 3) AS baseline,
            round(mean_jaccard / jaccard_baseline, 2) AS lift
     FROM group_summary ORDER BY group_name""",
    ),
    (
        "k-step sparsity: each saved step against the series' step before it (k steps apart), "
        "averaged over the series of each algorithm",
        """
     SELECT group_name, algorithm, step_from, step_to, count(*) AS series,
            round(avg(sparsity), 3) AS sparsity, round(avg(ulp1_share), 3) AS ulp1_share
     FROM step_sparsity GROUP BY group_name, algorithm, step_from, step_to
     ORDER BY group_name, algorithm = 'sft', algorithm, step_from""",
    ),
]


def cli_command() -> str:
    """How to call ``rlvr-ray`` from here: its name when that is on PATH, else the script next to
    this Python (``.venv/bin/rlvr-ray``), else ``python -m rlvr_ray.cli``."""
    bindir = Path(sys.executable).parent
    script = bindir / "rlvr-ray"
    found = shutil.which("rlvr-ray")
    if found and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "rlvr-ray"
    if not script.exists():
        return f"{sys.executable} -m rlvr_ray.cli"
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


def run(args: argparse.Namespace) -> int:
    from rlvr_ray.cli import geometry_warning, missing_extra, print_rows
    from rlvr_ray.lab.settings import PRESETS

    if args.preset not in PRESETS:
        presets = ", ".join(sorted(PRESETS))
        print(
            f"rlvr-ray demo: error: unknown preset {args.preset!r} (presets: {presets})",
            file=sys.stderr,
        )
        return 2
    if not args.planted:
        msg = missing_extra("demo", "lab", hint=" (or run the demo with --planted)")
        if msg:
            print(msg, file=sys.stderr)
            return 2

    from rlvr_ray.engine.config import load_sweep
    from rlvr_ray.engine.driver import run_scan
    from rlvr_ray.io import catalog

    out = Path(args.out)
    if args.planted:
        sweep = _planted_sweep(out / "checkpoints")
    else:
        from rlvr_ray.lab.build import build_lab

        print(f"building the lab families in {out / 'lab'} (cached after the first run) ...")
        sweep = build_lab(out / "lab", preset=args.preset)
    results = out / "results"
    print(f"scanning {sweep} ...")
    res = run_scan(load_sweep(sweep), str(results), num_cpus=args.num_cpus)
    for msg in res.errors + res.warnings:
        print(f"rlvr-ray: {msg}", file=sys.stderr)
    con = catalog.connect(str(results))
    try:
        warning = geometry_warning(con, res.scan_ids) if res.scan_ids else None
        if warning:
            print(f"rlvr-ray: {warning}", file=sys.stderr)
        print(
            f"scanned {res.n_tensors} tensors ({res.n_units_resumed} of {res.n_units} units "
            f"already done) in {res.seconds:.1f} s"
        )
        for title, sql in HEADLINE:
            cols, rows = catalog.run(con, sql)
            if not rows:  # the planted families have no training series: no step pairs
                continue
            print(f"\n{title}")
            print_rows(cols, rows)
    finally:
        con.close()
    cli = cli_command()
    print(f"\nevery run:  {cli} summary --out {results}")
    print(f'query it:   {cli} sql "SELECT * FROM run_sparsity" --out {results}')
    print(f"report:     {cli} report --out {results}")
    duckdb_cli = "" if shutil.which("duckdb") else "  (the CLI: pip install duckdb-cli)"
    print(f"open it:    duckdb {results / 'atlas.duckdb'}{duckdb_cli}")
    return res.exit_code


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="build demo checkpoints, scan them, print the headline",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    p.add_argument(
        "--out", default="demo-out", help="where checkpoints and results go (default: demo-out)"
    )
    p.add_argument(
        "--planted",
        action="store_true",
        help="planted synthetic families instead of the trained lab",
    )
    p.add_argument(
        "--preset",
        default="default",
        help="lab preset: default (minutes), tiny (seconds) or paper (wide; hours on a CPU) (default: default)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    p.set_defaults(func=run)
