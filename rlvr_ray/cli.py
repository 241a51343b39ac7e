"""The ``rlvr-ray`` command: scan, sql, summary (and lab, report, watch when installed).

rlvr-ray scan SWEEP.yaml --out results/
rlvr-ray scan --base BASE --run grpo=RUN_DIR --run sft=SFT_DIR --out results/
rlvr-ray summary --out results/
rlvr-ray sql "SELECT * FROM run_sparsity" --out results/
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
from pathlib import Path

DEFAULT_OUT = "results"


def _add_scan(sub) -> None:
    p = sub.add_parser("scan", help="scan base vs fine-tuned checkpoints into a results directory",
                       description="Scan a sweep (YAML) or one base with --run NAME=PATH runs.")  # fmt: skip
    p.add_argument("sweep", nargs="?", help="sweep YAML file (groups: name, base, runs)")
    p.add_argument("--base", help="base checkpoint (quick form, instead of a sweep file)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=PATH",
                   help="a run of the quick form; repeatable. NAME may carry ':ALGORITHM'")  # fmt: skip
    p.add_argument("--group", default="default", help="group name of the quick form (default: default)")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory or s3:// URI (default: {DEFAULT_OUT})")  # fmt: skip
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start an embedded Ray)")  # fmt: skip
    p.add_argument("--workers", type=int, help="number of actors (default: one per GPU, else one per CPU)")  # fmt: skip
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    p.add_argument("--gpus-per-worker", type=float, help="GPU share per actor (default: 1 when the cluster has GPUs, else 0)")  # fmt: skip
    p.add_argument("--memory-gb", type=float, help="memory per actor, GiB (Ray's memory resource); units that need more are refused (default: no limit)")  # fmt: skip
    p.add_argument("--unit-mb", type=int, default=256, help="target size of a work unit across all checkpoints, MiB (default: 256)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="redo units already done")
    p.add_argument("--no-geometry", action="store_true", help="skip SVD-based statistics")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank-k", type=int, metavar="N",
                      help="absolute k of the rank-k reconstruction for M_princ, every matrix "
                      "(default: the sweep's, else --rank-frac)")  # fmt: skip
    rank.add_argument("--rank-frac", type=float, metavar="F",
                      help="k of M_princ as a share of each matrix's short side p: "
                      "floor(F * p + 0.5), at least 1 (default: the sweep's, else 0.0417: "
                      "k = 64 at p = 1536)")  # fmt: skip
    p.add_argument("--alpha", type=float, help="share of weights in M_princ and M_low (default: the sweep's, else 0.5)")  # fmt: skip
    spectral = p.add_mutually_exclusive_group()
    spectral.add_argument("--spectral-k", type=int, metavar="N",
                          help="absolute k of the singular subspaces compared "
                          "(default: the sweep's, else --spectral-frac)")  # fmt: skip
    spectral.add_argument("--spectral-frac", type=float, metavar="F",
                          help="spectral k as a share of each matrix's short side, like "
                          "--rank-frac (default: the sweep's, else 0.0417)")  # fmt: skip
    p.add_argument("--svd-embeddings", action="store_true", help="also decompose embed/lm_head")
    p.add_argument("--progress", choices=["tty", "log", "quiet"], help="progress display (default: tty on a terminal, else quiet)")  # fmt: skip
    p.set_defaults(func=_scan)


def _sweep_from_args(args):
    from rlvr_ray.engine.config import SweepError, load_sweep, sweep_from_dict

    # flags given on the command line override the sweep file's params; absent ones do not
    params = {k: v for k, v in {"rank_k": args.rank_k, "alpha": args.alpha,
                                "spectral_k": args.spectral_k}.items() if v is not None}  # fmt: skip
    for kind in ("rank", "spectral"):  # a fraction on the command line beats the sweep's k
        if getattr(args, f"{kind}_frac") is not None:
            params |= {f"{kind}_frac": getattr(args, f"{kind}_frac"), f"{kind}_k": None}
    if args.no_geometry:
        params["geometry"] = False
    if args.svd_embeddings:
        params["svd_embeddings"] = True
    if args.sweep and (args.base or args.run):
        raise SweepError("give a sweep file or --base/--run, not both")
    if args.sweep:
        sweep = load_sweep(args.sweep)
        merged = {**sweep.params.model_dump(), **params}
        return sweep_from_dict({"groups": [g.model_dump() for g in sweep.groups], "params": merged},
                               Path(args.sweep).parent.resolve(), args.sweep)  # fmt: skip
    if not args.base or not args.run:
        raise SweepError("scan needs a sweep file, or --base PATH with at least one --run NAME=PATH")  # fmt: skip
    runs = []
    for spec in args.run:
        if "=" not in spec:
            raise SweepError(f"--run {spec!r}: expected NAME=PATH (or NAME:ALGORITHM=PATH)")
        name, path = spec.split("=", 1)
        name, _, algo = name.partition(":")
        runs.append({"name": name, "checkpoint": path, **({"algorithm": algo} if algo else {})})
    data = {"groups": [{"name": args.group, "base": args.base, "runs": runs}], "params": params}
    return sweep_from_dict(data, Path.cwd(), "(command line)")


def _scan(args) -> int:
    from rlvr_ray.engine.config import SweepError
    from rlvr_ray.engine.driver import run_scan

    try:
        sweep = _sweep_from_args(args)
    except SweepError as e:
        print(f"rlvr-ray: error: {e}", file=sys.stderr)
        return 2
    try:
        res = run_scan(sweep, args.out, address=args.address, workers=args.workers,
                       num_cpus=args.num_cpus, gpus_per_worker=args.gpus_per_worker,
                       force=args.force, progress=args.progress, unit_bytes=args.unit_mb << 20,
                       memory_gb=args.memory_gb)  # fmt: skip
    except OSError as e:  # an unreachable store, a missing bucket, a read-only directory
        print(f"rlvr-ray: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for msg in res.errors + res.warnings:
        print(f"rlvr-ray: {msg}", file=sys.stderr)
    for msg in res.skipped[:20]:
        print(f"rlvr-ray: skipped {msg}", file=sys.stderr)
    if len(res.skipped) > 20:
        print(f"rlvr-ray: ... and {len(res.skipped) - 20} more skipped tensors "
              "(SELECT * FROM tensors WHERE status NOT IN ('ok', 'vocab_resized'))", file=sys.stderr)  # fmt: skip
    if res.scan_ids:
        warning = geometry_warning(res.out, res.scan_ids)
        if warning:
            print(f"rlvr-ray: {warning}", file=sys.stderr)
    rate = f" ({res.n_bytes / 1e9 / res.unit_seconds:.2f} GB/s)" if res.unit_seconds else ""
    print(f"scanned {res.n_tensors} tensors in {res.n_units} units "
          f"({res.n_units_resumed} already done), {res.n_bytes / 1e9:.2f} GB read in "
          f"{res.unit_seconds:.1f} s of units{rate}, {res.seconds:.1f} s in all -> {res.out}")  # fmt: skip
    if res.scan_ids:
        _print_summary(res.out)
    return res.exit_code


FLAGGED_WHY = {"k_not_below_rank": "k > short side / 4",
               "small_gap": "relative singular-value gap at k < 0.001"}  # fmt: skip


def geometry_warning(out: str, scan_ids: list[str]) -> str | None:
    """One line when the scans decomposed matrices whose geometry is no finding, else None."""
    from rlvr_ray.io import catalog

    _, found = catalog.query(out, """
        SELECT geometry_status, count(DISTINCT group_name || '/' || tensor) FROM tensors_all
        WHERE list_contains(?, scan_id) AND geometry_status IN ('ok', 'k_not_below_rank', 'small_gap')
        GROUP BY ALL ORDER BY 2 DESC, 1""", [list(scan_ids)])  # fmt: skip
    counts = dict(found)
    flagged = [(s, n) for s, n in found if s != "ok"]
    if not flagged:
        return None
    why = ", ".join(f"{n} {s} ({FLAGGED_WHY[s]})" for s, n in flagged)
    return (f"warning: geometry of {sum(n for _, n in flagged)} of {sum(counts.values())} "
            f"decomposed matrices is no finding: {why}; summary and views leave their overlaps "
            "and angles out (SELECT tensor, rows, cols, rank_k, sigma_gap, geometry_status FROM "
            "tensors WHERE geometry_status <> 'ok')")  # fmt: skip


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def print_rows(cols: list[str], rows: list[tuple], fmt: str = "table", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt == "csv":
        w = csv.writer(stream)
        w.writerow(cols)
        w.writerows(rows)
    elif fmt == "json":
        json.dump([dict(zip(cols, r, strict=True)) for r in rows], stream, default=str, indent=1)
        stream.write("\n")
    else:
        cells = [[_fmt(v) for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
        stream.write("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip() + "\n")  # fmt: skip
        stream.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            stream.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")  # fmt: skip


def _print_summary(out: str, fmt: str = "table") -> None:
    from rlvr_ray.io import catalog
    from rlvr_ray.io.summary import SUMMARY_SECTIONS

    for title, sql in SUMMARY_SECTIONS:
        cols, rows = catalog.query(out, sql)
        if rows:
            if fmt == "table":
                print(f"\n{title}")
            print_rows(cols, rows, fmt)


def _sql(args) -> int:
    import duckdb

    from rlvr_ray.io import catalog

    try:
        cols, rows = catalog.query(args.out, args.query)
    except (duckdb.Error, FileNotFoundError) as e:
        print(f"rlvr-ray: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print_rows(cols, rows, args.format)
    return 0


def _summary(args) -> int:
    try:
        _print_summary(args.out, args.format)
    except FileNotFoundError as e:
        print(f"rlvr-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlvr-ray",
        description="Where fine-tuning moved a model's bf16 weights: scan checkpoints on Ray, "
        "query the Parquet/DuckDB atlas, report, watch the Hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_scan(sub)
    p = sub.add_parser("sql", help="run SQL over a results directory's atlas")
    p.add_argument("query", help='SQL, e.g. "SELECT * FROM run_sparsity"')
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default: {DEFAULT_OUT})")  # fmt: skip
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=_sql)
    p = sub.add_parser("summary", help="print the headline table of a results directory")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default: {DEFAULT_OUT})")  # fmt: skip
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=_summary)
    # optional subcommands: each module has add_parser(subparsers)
    for name, mod in OPTIONAL_COMMANDS.items():
        try:
            importlib.import_module(mod).add_parser(sub)
        except ImportError as e:  # a missing extra: the command explains instead of vanishing
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e, name=name: _unavailable(name, e))
    return parser


OPTIONAL_COMMANDS = {"lab": "rlvr_ray.lab.cli", "report": "rlvr_ray.report.cli",
                     "watch": "rlvr_ray.hub.cli", "demo": "rlvr_ray.demo"}  # fmt: skip


def _unavailable(name: str, e: ImportError) -> int:
    print(f"rlvr-ray: error: `{name}` is unavailable here ({e}); install the extras, e.g. "
          "pip install 'rlvr-ray[lab,report]'", file=sys.stderr)  # fmt: skip
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
