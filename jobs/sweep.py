"""Ray job entrypoint: scan a sweep on the cluster this job runs on.

On a cluster started with ``ray start`` (token authentication on: Ray 2.60 writes the token to
``~/.ray/auth_token`` on the head; copy that file to the machine you submit from, or export it
as RAY_AUTH_TOKEN), from the repository root::

    export RAY_AUTH_MODE=token
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/sweep.py SWEEP.yaml --out s3://bucket/atlas
    ray job logs --address http://127.0.0.1:8265 --follow JOB_ID   # progress every 10 s

(The dashboard listens on 127.0.0.1: from another machine, tunnel first, e.g.
``ssh -L 8265:127.0.0.1:8265 head``.) Every ``rlvr-ray scan`` flag works here
(``--workers``, ``--gpus-per-worker``, ``--unit-mb``, ``--force``, ...); progress defaults to
``log``. Checkpoint paths in SWEEP.yaml must be reachable from every node: ``hf://``,
absolute paths on a shared filesystem, or paths relative to the sweep file inside the working
directory. Inside a job RAY_ADDRESS is set, so the scan joins the job's cluster.

Without a cluster (CPU, embedded Ray)::

    python jobs/sweep.py SWEEP.yaml --out results/
"""

from __future__ import annotations

import sys

from rlvr_ray.cli import main


def job_argv(argv: list[str]) -> list[str]:
    """``rlvr-ray scan`` arguments of this job: the given ones, with log progress by default."""
    has_progress = any(a == "--progress" or a.startswith("--progress=") for a in argv)
    return ["scan", *argv, *([] if has_progress else ["--progress", "log"])]


if __name__ == "__main__":
    sys.exit(main(job_argv(sys.argv[1:])))
