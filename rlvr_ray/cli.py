"""The ``rlvr-ray`` command: scan, sql, summary (and lab, report, watch when installed).

rlvr-ray scan SWEEP.yaml --out results/
rlvr-ray scan --base BASE --run grpo=RUN_DIR --run sft=SFT_DIR --out results/
rlvr-ray summary --out results/
rlvr-ray sql "SELECT * FROM run_sparsity" --out results/

Only the command that runs is imported: ``sql``, ``summary`` and ``--help`` load DuckDB and
Arrow, never torch, Ray or numba.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import gc
import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from rlvr_ray.sql.status import NOT_COMPARED_SQL
from rlvr_ray.sql.summary import SUMMARY_SECTIONS
from rlvr_ray.stats.rank_rule import RANK_FRAC

DEFAULT_OUT = "results"


def _add_scan(sub) -> None:
    p = sub.add_parser(
        "scan",
        help="scan base vs fine-tuned checkpoints into a results directory",
        description="Scan a sweep (YAML) or one base with --run NAME=PATH runs.",
    )
    p.add_argument("sweep", nargs="?", help="sweep YAML file (groups: name, base, runs)")
    p.add_argument("--base", help="base checkpoint (quick form, instead of a sweep file)")
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a run of the quick form; repeatable. NAME may carry ':ALGORITHM'",
    )
    p.add_argument(
        "--no-consistency",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this --run out of the group's cross-run consistency; repeatable (default: RL "
        "runs and runs without an algorithm are in, SFT runs out)",
    )
    p.add_argument(
        "--master",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="the fp32 master weights (F32 safetensors) saved beside --run NAME's bf16 "
        "checkpoint: adds its precision_gate rows; repeatable (default: none)",
    )
    p.add_argument(
        "--group", default="default", help="group name of the quick form (default: default)"
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"results directory or s3:// URI (default: {DEFAULT_OUT})",
    )
    p.add_argument(
        "--address",
        help="Ray cluster to join (default: $RAY_ADDRESS, else none: see --executor)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="number of actors, or of threads in-process (default: one per GPU, else one per CPU)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    p.add_argument(
        "--executor",
        choices=("auto", "ray", "local"),
        default=None,
        help="where units run: 'ray' (actors), 'local' (threads of this process, no Ray; "
        "--workers or --num-cpus of them) or 'auto': local for a scan of local files of at most "
        "16 GiB on a machine without a GPU and no --address / $RAY_ADDRESS, else Ray "
        "(default: $RLVR_RAY_EXECUTOR, else auto)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPU share per actor (default: 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        help="memory per actor, GiB (Ray's memory resource); units that need more are refused (default: no limit)",
    )
    p.add_argument(
        "--unit-mb",
        type=int,
        default=256,
        help="target size of a work unit across all checkpoints, MiB (default: 256)",
    )
    p.add_argument("--force", action="store_true", help="redo units already done")
    p.add_argument("--no-geometry", action="store_true", help="skip SVD-based statistics")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument(
        "--rank-k",
        type=int,
        metavar="N",
        help="absolute k of the rank-k reconstruction for M_princ, every matrix "
        "(default: the sweep's, else --rank-frac)",
    )
    rank.add_argument(
        "--rank-frac",
        type=float,
        metavar="F",
        help="k of M_princ as a share of each matrix's short side p: "
        "floor(F * p + 0.5), at least 1 (default: the sweep's, else "
        f"{RANK_FRAC}: k = 64 at p = 1536)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        help="share of weights in M_princ and M_low (default: the sweep's, else 0.5)",
    )
    spectral = p.add_mutually_exclusive_group()
    spectral.add_argument(
        "--spectral-k",
        type=int,
        metavar="N",
        help="absolute k of the singular subspaces compared "
        "(default: the sweep's, else --spectral-frac)",
    )
    spectral.add_argument(
        "--spectral-frac",
        type=float,
        metavar="F",
        help="spectral k as a share of each matrix's short side, like "
        f"--rank-frac (default: the sweep's, else {RANK_FRAC})",
    )
    p.add_argument("--svd-embeddings", action="store_true", help="also decompose embed/lm_head")
    p.add_argument(
        "--max-svd-numel",
        type=int,
        metavar="N",
        help="matrices of more than N elements get no geometry (status skipped_size; "
        "the scan's last lines name them) (default: the sweep's, else 67108864 = "
        "64 Mi: every 8B matrix, not the 70B MLP's 28672 x 8192)",
    )
    p.add_argument(
        "--full-spectrum",
        action="store_true",
        help="store every singular value of base and run in spectra (default: the top spectral k)",
    )
    p.add_argument(
        "--progress",
        choices=["tty", "log", "quiet"],
        help="progress display: tty redraws one line, log prints one every 10 s (default: tty "
        "on a terminal, else log)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download hf:// checkpoints whole into the cache and scan them from there (default: "
        "each actor reads its tensors by HTTP range requests)",
    )
    p.set_defaults(func=_scan)


def _sweep_from_args(args):
    from rlvr_ray.engine.config import SweepError, load_sweep, quick_run, sweep_from_dict

    # flags given on the command line override the sweep file's params; absent ones do not
    params = {
        k: v
        for k, v in {
            "rank_k": args.rank_k,
            "alpha": args.alpha,
            "spectral_k": args.spectral_k,
        }.items()
        if v is not None
    }
    for kind in ("rank", "spectral"):  # a fraction on the command line beats the sweep's k
        if getattr(args, f"{kind}_frac") is not None:
            params |= {f"{kind}_frac": getattr(args, f"{kind}_frac"), f"{kind}_k": None}
    if args.no_geometry:
        params["geometry"] = False
    if args.svd_embeddings:
        params["svd_embeddings"] = True
    if args.full_spectrum:
        params["full_spectrum"] = True
    if args.max_svd_numel is not None:
        params["max_svd_numel"] = args.max_svd_numel
    if args.sweep and (args.base or args.run or args.no_consistency or args.master):
        raise SweepError("give a sweep file or --base/--run, not both")
    if args.sweep:
        sweep = load_sweep(args.sweep)
        merged = {**sweep.params.model_dump(), **params}
        return sweep_from_dict(
            {"groups": [g.model_dump() for g in sweep.groups], "params": merged},
            Path(args.sweep).parent.resolve(),
            args.sweep,
        )
    if not args.base or not args.run:
        raise SweepError(
            "scan needs a sweep file, or --base PATH with at least one --run NAME=PATH"
        )
    masters = {}
    for spec in args.master:
        if "=" not in spec:
            raise SweepError(f"--master {spec!r}: expected NAME=PATH")
        name, path = spec.split("=", 1)
        masters[name] = path
    runs = []
    for spec in args.run:
        if "=" not in spec:
            raise SweepError(f"--run {spec!r}: expected NAME=PATH (or NAME:ALGORITHM=PATH)")
        name, path = spec.split("=", 1)
        runs.append(quick_run(name, path, masters.get(name.partition(":")[0])))
        if runs[-1]["name"] in args.no_consistency:
            runs[-1]["consistency"] = False
    if unknown := sorted(set(args.no_consistency) - {r["name"] for r in runs}):
        raise SweepError(f"--no-consistency {unknown[0]}: no --run of that name")
    if unknown := sorted(set(masters) - {r["name"] for r in runs}):
        raise SweepError(f"--master {unknown[0]}: no --run of that name")
    data = {"groups": [{"name": args.group, "base": args.base, "runs": runs}], "params": params}
    return sweep_from_dict(data, Path.cwd(), "(command line)")


#: main() runs as the program itself (the process is ours, not a caller's: see rlvr_ray.probes)
_PROGRAM = False


def _scan(args) -> int:
    if _PROGRAM:  # this process is the scan's (before pyarrow is imported: its allocator)
        from rlvr_ray.probes import own_process

        own_process()

    from rlvr_ray.engine.config import SweepError, downloaded
    from rlvr_ray.engine.driver import run_scan

    try:
        sweep = _sweep_from_args(args)
        if args.download:
            sweep = downloaded(sweep)
    except SweepError as e:
        print(f"rlvr-ray: error: {e}", file=sys.stderr)
        return 2
    from rlvr_ray.io.results import open_results

    try:
        results = open_results(args.out)  # opened once: the scan, then the atlas
        res = run_scan(
            sweep,
            results,
            address=args.address,
            workers=args.workers,
            num_cpus=args.num_cpus,
            gpus_per_worker=args.gpus_per_worker,
            force=args.force,
            progress=args.progress,
            unit_bytes=args.unit_mb << 20,
            memory_gb=args.memory_gb,
            executor=args.executor,
        )
    except SweepError as e:  # a local checkpoint path that does not exist
        print(f"rlvr-ray: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreachable store, a missing bucket, a read-only directory
        print(f"rlvr-ray: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any unit ran (opening checkpoints, starting Ray)
        print("rlvr-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if res.interrupted:
        print(
            f"rlvr-ray: interrupted: {res.n_units_kept} of {res.n_units} units are kept in "
            f"{res.out}; rerun the same command to resume",
            file=sys.stderr,
        )
        return res.exit_code
    for msg in res.errors + res.warnings:
        print(f"rlvr-ray: {msg}", file=sys.stderr)
    for msg in res.skipped[:20]:
        print(f"rlvr-ray: skipped {msg}", file=sys.stderr)
    if len(res.skipped) > 20:
        print(
            f"rlvr-ray: ... and {len(res.skipped) - 20} more skipped tensors "
            f"(SELECT * FROM tensors WHERE {NOT_COMPARED_SQL})",
            file=sys.stderr,
        )
    print(scan_line(res))
    if res.disk_full:  # no catalog query: the atlas cannot be written
        print(
            f"rlvr-ray: error: disk full writing to {res.out}: {res.n_units_kept} of "
            f"{res.n_units} units are kept; free some space and rerun the same command to "
            "resume",
            file=sys.stderr,
        )
        return res.exit_code
    if res.scan_ids:
        from rlvr_ray.io import catalog

        con = catalog.connect(results, external_access=False)
        try:
            warning = geometry_warning(con, res.scan_ids)
            if warning:
                print(f"rlvr-ray: {warning}", file=sys.stderr)
            if skipped := size_skip_warning(con, res.scan_ids, sweep.params.max_svd_numel):
                print(f"rlvr-ray: {skipped}", file=sys.stderr)
            _print_summary(con, scan_ids=res.scan_ids)  # this scan's groups only
        finally:
            con.close()
    return res.exit_code


FLAGGED_WHY = {
    "k_not_below_rank": "k > short side / 4",
    "small_gap": "relative singular-value gap at k < 0.001",
}


def geometry_warning(con, scan_ids: list[str]) -> str | None:
    """One line when the scans decomposed matrices whose geometry is no finding, else None;
    ``con``: a connection to the atlas (:func:`rlvr_ray.io.catalog.connect`)."""
    from rlvr_ray.io import catalog

    _, found = catalog.run(
        con,
        """
        SELECT geometry_status, count(DISTINCT group_name || '/' || tensor) FROM tensors_all
        WHERE list_contains(?, scan_id) AND geometry_status IN ('ok', 'k_not_below_rank', 'small_gap')
        GROUP BY ALL ORDER BY 2 DESC, 1""",
        [list(scan_ids)],
    )
    counts = dict(found)
    flagged = [(s, n) for s, n in found if s != "ok"]
    if not flagged:
        return None
    why = ", ".join(f"{n} {s} ({FLAGGED_WHY[s]})" for s, n in flagged)
    return (
        f"warning: geometry of {sum(n for _, n in flagged)} of {sum(counts.values())} "
        f"decomposed matrices is no finding: {why}; summary and views leave their overlaps "
        "and angles out (SELECT tensor, rows, cols, rank_k, sigma_gap, geometry_status FROM "
        "tensors WHERE geometry_status <> 'ok')"
    )


def size_skip_warning(con, scan_ids: list[str], max_svd_numel: int) -> str | None:
    """One line when the scans left matrices without geometry for their size, else None;
    ``con``: a connection to the atlas (:func:`rlvr_ray.io.catalog.connect`)."""
    from rlvr_ray.io import catalog

    _, found = catalog.run(
        con,
        """
        SELECT DISTINCT group_name, tensor, rows, cols, numel FROM tensors_all
        WHERE list_contains(?, scan_id) AND geometry_status = 'skipped_size'
        ORDER BY numel DESC, group_name, tensor""",
        [list(scan_ids)],
    )
    if not found:
        return None
    _, name, rows, cols, numel = found[0]
    return (
        f"warning: no geometry for {len(found)} matrices of more than --max-svd-numel "
        f"{max_svd_numel} elements (skipped_size), the largest {name} ({rows} x {cols} = "
        f"{numel}); rerun with --max-svd-numel {numel} to include them (SELECT tensor, rows, "
        "cols FROM tensors WHERE geometry_status = 'skipped_size')"
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _json_value(v):
    """A value JSON can hold: NaN and infinities become null (JSON has neither)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):
        return _json_value(float(v))
    if isinstance(v, (dt.date, dt.datetime, dt.time)):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return v


def json_rows(cols: list[str], rows: list[tuple]) -> list[dict]:
    """Rows as a list of ``{column: value}`` objects, every value valid JSON."""
    return [{c: _json_value(v) for c, v in zip(cols, r, strict=True)} for r in rows]


def print_rows(cols: list[str], rows: list[tuple], fmt: str = "table", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt == "csv":
        w = csv.writer(stream)
        w.writerow(cols)
        w.writerows(rows)
    elif fmt == "json":
        json.dump(json_rows(cols, rows), stream, default=str, indent=1, allow_nan=False)
        stream.write("\n")
    else:
        cells = [[_fmt(v) for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
        stream.write(
            "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip() + "\n"
        )
        stream.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            stream.write(
                "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
            )


def scan_line(res) -> str:
    """The one line that says what a scan did (or that it had nothing left to do)."""
    from rlvr_ray.engine.progress import size_text

    if res.n_units and res.n_units_resumed == res.n_units:
        return (
            f"nothing new to scan: all {res.n_units} units ({res.n_tensors} tensors) were "
            f"already done (--force redoes them) -> {res.out}"
        )
    rate = f" ({size_text(res.n_bytes / res.unit_seconds)}/s)" if res.unit_seconds else ""
    where = {"local": " in-process", "ray": " on Ray"}.get(getattr(res, "executor", ""), "")
    return (
        f"scanned {res.n_tensors} tensors in {res.n_units} units "
        f"({res.n_units_resumed} already done), {size_text(res.n_bytes)} read in "
        f"{res.unit_seconds:.1f} s of units{where}{rate}, {res.seconds:.1f} s in all -> {res.out}"
    )


def _print_summary(
    con, fmt: str = "table", table: str | None = None, scan_ids: list[str] | None = None
) -> None:
    """The summary tables of the atlas open in ``con``: as titled tables, one JSON object keyed
    by table name, or (csv) the one table named by ``table``. ``scan_ids``: only the groups of
    these scans (the end of a scan), and no table that has no group (per algorithm)."""
    from rlvr_ray.io import catalog
    from rlvr_ray.sql.summary import COVERAGE_SQL, COVERAGE_WARN, coverage_warning, of_scans

    sections = [s for s in SUMMARY_SECTIONS if table is None or s[0] == table]
    params: list = []
    if scan_ids is not None:
        sections = [(n, title, of_scans(sql)) for n, title, sql in sections if n != "algorithms"]
        params = [list(scan_ids)]
    if fmt == "json":
        doc = {name: json_rows(*catalog.run(con, sql, params)) for name, _, sql in sections}
        json.dump(doc, sys.stdout, default=str, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    for _, title, sql in sections if fmt != "json" else ():
        cols, rows = catalog.run(con, sql, params)
        if fmt == "csv":
            print_rows(cols, rows, fmt)
        elif rows:
            print(f"\n{title}")
            print_rows(cols, rows, fmt)
    coverage = COVERAGE_SQL if scan_ids is None else of_scans(COVERAGE_SQL)
    for row in catalog.run(con, coverage, [COVERAGE_WARN, *params])[1]:
        print(f"rlvr-ray: {coverage_warning(*row)}", file=sys.stderr)


def _error(msg: str) -> int:
    print(f"rlvr-ray: error: {msg}", file=sys.stderr)
    return 2


def _sql(args) -> int:
    import duckdb

    from rlvr_ray.io import catalog

    try:
        cols, rows = catalog.query(args.out, args.query, external_access=args.allow_external)
    except duckdb.PermissionException as e:  # a refusal: one line, and how to lift it
        hint = " (rlvr-ray sql reads the atlas only; --allow-external lifts this)"
        hint = "" if args.allow_external else hint
        return _error(str(e).splitlines()[0] + hint)
    except duckdb.Error as e:  # DuckDB's whole message: its "Did you mean" and LINE hints
        return _error(str(e).strip())
    except (catalog.QueryError, FileNotFoundError) as e:
        return _error(str(e).splitlines()[0])
    print_rows(cols, rows, args.format)
    return 0


def _summary(args) -> int:
    if args.format == "csv" and args.table is None:
        names = ", ".join(name for name, _, _ in SUMMARY_SECTIONS)
        return _error(f"--format csv writes one table: add --table NAME ({names})")
    from rlvr_ray.io import catalog

    try:
        con = catalog.connect(args.out, external_access=False)
    except FileNotFoundError as e:
        return _error(str(e))
    try:
        _print_summary(con, args.format, args.table)
    finally:
        con.close()
    return 0


SQL_DESCRIPTION = """\
Run one SQL statement on a results directory's atlas (DuckDB, read-only) and print the rows.
The views hold each run's latest scan: tensors, profiles, spectra, checkpoints, consistency,
maps and the aggregates run_sparsity, summary, group_summary, density_by_role_depth, ...;
*_all tables keep every scan. SHOW TABLES lists them all."""

SUMMARY_DESCRIPTION = """\
Print the headline tables of a results directory: runs (sparsity, 1-ULP share per run),
runs_geometry (overlap with principal / low-magnitude weights, NSS, principal angles; scans
with geometry only) and groups (cross-run Jaccard of update masks vs its baseline).
--format json prints one object keyed by table name; --format csv prints the one table named
by --table."""

FORMAT_HELP = "table (aligned text), csv or json (default: table)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; of the optional subcommands only ``command``'s module is imported."""
    parser = argparse.ArgumentParser(
        prog="rlvr-ray",
        description="Where fine-tuning moved a model's bf16 weights: scan checkpoints on Ray, "
        "query the Parquet/DuckDB atlas, report, watch the Hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_scan(sub)
    p = sub.add_parser(
        "sql",
        help="run SQL over a results directory's atlas",
        description=SQL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", help='SQL, e.g. "SELECT * FROM run_sparsity"')
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default: {DEFAULT_OUT})")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help=FORMAT_HELP)
    p.add_argument(
        "--allow-external",
        action="store_true",
        help="let the SQL read and write other files, attach databases and install or load "
        "DuckDB extensions (default: it reads the atlas only)",
    )
    p.set_defaults(func=_sql)
    p = sub.add_parser(
        "summary",
        help="print the headline tables of a results directory; warns (stderr) about each run "
        "with under 99%% of its weights compared",
        description=SUMMARY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default: {DEFAULT_OUT})")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help=FORMAT_HELP)
    p.add_argument(
        "--table",
        choices=[name for name, _, _ in SUMMARY_SECTIONS],
        help="print this table only (needed by --format csv) (default: all)",
    )
    p.set_defaults(func=_summary)
    _add_optional(sub, command)
    return parser


# Optional subcommands: name -> (module with add_parser(subparsers), the extra it needs, help).
# Only the module of the command that runs is imported, so --help and sql stay light.
OPTIONAL_COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "lab": (
        "rlvr_ray.lab.cli",
        "lab",
        "train small Qwen2/Llama/Mistral checkpoint families (base, RL and SFT runs)",
    ),
    "report": ("rlvr_ray.report.cli", "report", "write an HTML report of a results directory"),
    "watch": ("rlvr_ray.hub.cli", None, "scan newly published RL fine-tunes of Hub bases"),
    "demo": (
        "rlvr_ray.demo",
        None,
        "build demo checkpoints, scan them, print the headline",
    ),
}

# The extras of pyproject.toml: the modules each brings.
EXTRAS: dict[str, tuple[str, ...]] = {
    "lab": ("transformers",),
    "report": ("matplotlib",),
    "s3": ("boto3",),
}


def _extra_error(command: str, module: str, extra: str, hint: str = "") -> str:
    return (
        f"rlvr-ray {command}: error: needs {module}, from the `{extra}` extra: "
        f"pip install 'rlvr-ray[{extra}]'{hint}"
    )


def missing_extra(command: str, extra: str, hint: str = "") -> str | None:
    """The one-line error when a module of ``extra`` cannot be found, else None."""
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return _extra_error(command, module, extra, hint)
    return None


def _extra_of_module(name: str | None) -> str | None:
    top = (name or "").split(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)


def _add_optional(sub, command: str | None) -> None:
    for name, (module, extra, help_text) in OPTIONAL_COMMANDS.items():
        if name == command:
            try:
                importlib.import_module(module).add_parser(sub)
                continue
            except ImportError as e:  # the command explains instead of vanishing
                sub.add_parser(name, help=help_text).set_defaults(
                    func=lambda args, e=e, name=name: _unavailable(name, e)
                )
                continue
        if extra and missing_extra(name, extra):
            help_text += f" (needs pip install 'rlvr-ray[{extra}]')"
        sub.add_parser(name, help=help_text)


def _unavailable(command: str, e: ImportError) -> int:
    extra = _extra_of_module(e.name)
    if extra:
        return _error_line(_extra_error(command, e.name, extra))
    return _error_line(f"rlvr-ray {command}: error: unavailable here ({str(e).splitlines()[0]})")


def _error_line(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 2


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program itself, not a caller (a test, a script) that goes on
        global _PROGRAM
        _PROGRAM = True
        try:
            code = _main(sys.argv[1:])
        finally:
            # what was made lives until exit: spare the interpreter's teardown its collections
            # over every object (0.2-0.3 s once numba's kernels are loaded)
            gc.freeze()
        # not after an interrupt: a unit thread may still be writing, and keeps the usual exit
        if code != 130 and _command_of(sys.argv[1:]) == "scan" and "ray" not in sys.modules:
            _exit_now(code)
        return code
    return _main(list(argv))


def _exit_now(code: int) -> None:
    """End a scan run in-process at once: everything it wrote is closed and renamed into place,
    so the interpreter's teardown (unloading numba, DuckDB and Arrow: ~35 ms) has nothing left
    to do. Not after Ray was loaded (its own exit hooks run), after an interrupt, or when the
    output cannot be flushed (a closed pipe: the usual exit reports it)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, OSError, ValueError):
        return
    os._exit(code)


def _main(argv: list[str]) -> int:
    command = _command_of(argv)
    args = build_parser(command).parse_args(argv)
    extra = OPTIONAL_COMMANDS.get(args.command, ("", None, ""))[1]
    msg = extra and missing_extra(args.command, extra)
    if msg:
        return _error_line(msg)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:  # an extra's module missing below the command
        if _extra_of_module(e.name) is None:
            raise
        return _unavailable(args.command, e)
    except BrokenPipeError:  # the reader (| head) is gone: stop quietly, like the shell's tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not fail again
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
