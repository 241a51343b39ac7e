"""``rlvr-ray watch``: scan newly published RL fine-tunes of Hub bases, once or on a schedule.

rlvr-ray watch --base Qwen/Qwen2.5-Math-1.5B --out results/            # one round
rlvr-ray watch --base ORG/NAME --base ORG/OTHER --out results/ --every 6h   # forever
rlvr-ray watch --base ORG/NAME --out results/ --dry-run                 # list, scan nothing
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "watch",
        help="scan newly published RL fine-tunes of Hub bases",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    p.add_argument(
        "--base",
        action="append",
        required=True,
        metavar="ORG/NAME",
        help="Hub base model to follow; repeatable",
    )
    p.add_argument(
        "--out", default="results", help="results directory or s3:// URI (default: results)"
    )
    p.add_argument(
        "--every",
        metavar="DURATION",
        help="run a round every DURATION (30m, 6h, 1d) forever (default: one round)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=50,
        help="newest fine-tunes looked at per base and round (default: 50)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be scanned; download and record nothing",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download whole snapshots and scan those (default: read each tensor by HTTP range "
        "requests)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="with --download: keep downloads after the scan (default: delete them; cache: $RLVR_RAY_CACHE/hub or ~/.cache/rlvr-ray/hub)",
    )
    p.add_argument(
        "--include-non-rl",
        action="store_true",
        help="also scan fine-tunes with no RL evidence (SFT, ...)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="tries per Hub request on transient errors (default: 3)",
    )
    p.add_argument(
        "--retry-wait",
        type=float,
        default=2.0,
        help="first retry backoff in seconds, doubling (default: 2)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="rounds a failing model is retried before giving up (default: 3)",
    )
    p.add_argument(
        "--address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded Ray)"
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    p.add_argument(
        "--workers", type=int, help="scan actors (default: one per GPU, else one per CPU)"
    )
    p.add_argument("--no-geometry", action="store_true", help="skip SVD-based statistics")
    p.set_defaults(func=run)


def config_from_args(args):
    from rlvr_ray.hub.watch import WatchConfig

    return WatchConfig(
        bases=tuple(args.base),
        out=args.out,
        limit=args.limit,
        dry_run=args.dry_run,
        download=args.download,
        keep=args.keep,
        include_non_rl=args.include_non_rl,
        retries=max(args.retries, 1),
        retry_wait=args.retry_wait,
        max_attempts=args.max_attempts,
        address=args.address,
        num_cpus=args.num_cpus,
        workers=args.workers,
        geometry=not args.no_geometry,
    )


def run(args) -> int:
    from rlvr_ray.hub.client import parse_ref
    from rlvr_ray.hub.watch import parse_duration, watch_forever, watch_once
    from rlvr_ray.io.checkpoint import CheckpointError

    try:
        for b in args.base:
            repo, rev = parse_ref(b)
            if rev:
                raise CheckpointError(f"--base {b}: give ORG/NAME without a revision")
        every = parse_duration(args.every) if args.every else None
    except (CheckpointError, ValueError) as e:
        print(f"rlvr-ray: error: {e}", file=sys.stderr)
        return 2
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # per-file bars would flood a job's log
    cfg = config_from_args(args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731  (a job's log must stream)
    if every is None:
        report = watch_once(cfg, log)
        for e in report.errors:
            print(f"rlvr-ray: {e}", file=sys.stderr)
        return report.exit_code
    return watch_forever(cfg, every, log)
