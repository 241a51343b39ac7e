"""Ray job entrypoint of the Hub watch: one round (or --every DURATION forever) on the cluster.

ray job submit --address http://HEAD:8265 --working-dir . -- \
    python jobs/watch.py --base Qwen/Qwen2.5-Math-1.5B --out s3://bucket/atlas
CPU / laptop: python jobs/watch.py --base ORG/NAME --out results/ --num-cpus 2
Flags are those of ``rlvr-ray watch`` (``--help``).
"""

from __future__ import annotations

import argparse
import sys

from rlvr_ray.hub.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/watch.py")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["watch", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
