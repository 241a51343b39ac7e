"""The ``rlvr-ray report`` subcommand: a self-contained HTML report of a results directory.

rlvr-ray report --out results/                       # -> results/report.html
rlvr-ray report --out results/ --format png          # + results/report/NN-name.png
rlvr-ray report --out results/ --layer 13 --group qwen2-lab --report /tmp/r.html
"""

from __future__ import annotations

import sys

DEFAULT_OUT = "results"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write an HTML report of a results directory",
        description="Write a self-contained HTML report (figures embedded "
        "as PNG) built from the results directory's tables.",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"results directory or s3:// URI (default: {DEFAULT_OUT})",
    )
    p.add_argument(
        "--layer",
        type=int,
        help="layer index of the maps, step profiles and spectra (default: the middle layer)",
    )
    p.add_argument(
        "--group",
        help="report on this group only (default: every group; detail figures for the 4 with most runs)",
    )
    p.add_argument(
        "--format",
        choices=["html", "png"],
        default="html",
        help="png: also write each figure as its own PNG next to the report (default: html)",
    )
    p.add_argument(
        "--report",
        help="path of the HTML file (default: OUT/report.html; PNGs go to a folder named after it)",
    )
    p.set_defaults(func=_report)


def _report(args) -> int:
    import duckdb

    from rlvr_ray.report.data import ReportError
    from rlvr_ray.report.html import write_report

    try:
        written = write_report(
            args.out, layer=args.layer, group=args.group, fmt=args.format, report=args.report
        )
    except (ReportError, FileNotFoundError, duckdb.Error, OSError) as e:
        print(f"rlvr-ray: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    extra = f" and {len(written) - 1} PNG figures" if len(written) > 1 else ""
    print(f"wrote {written[0]}{extra}")
    return 0
