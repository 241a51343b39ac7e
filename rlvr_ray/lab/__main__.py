"""Build the lab from the command line.

python -m rlvr_ray.lab --out lab-out                 # default preset, a few minutes on 2 CPUs
python -m rlvr_ray.lab --out /tmp/lab --preset tiny  # seconds
"""

from __future__ import annotations

import argparse
import sys

from rlvr_ray.lab.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as the ``lab`` subcommand's flags and run it."""
    parser = argparse.ArgumentParser(prog="python -m rlvr_ray.lab")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
