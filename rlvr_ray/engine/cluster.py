"""Ray for a scan: join a cluster or start an embedded one (127.0.0.1 only, its token file
private), decide what each actor asks of it (``Placement``) and start the actor pool.

The actors import torch and numba; this module does not (``actor_class`` imports them late).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from rlvr_ray.engine.pool import ActorPool
from rlvr_ray.io.results import storage_env
from rlvr_ray.io.sources import source_env


def _join_failed(message: str) -> str:
    """A failed join's first line, and where this client has no token authentication on (Ray
    2.60's `ray start` turns it on: a client without it is refused), how to turn it on."""
    line = message.strip().splitlines()[0] if message.strip() else "cannot join the cluster"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        line += (
            "; a cluster started with token authentication (Ray 2.60's default) refuses a "
            "client without it: set RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token)"
        )
    return line


def _init_ray(
    address: str | None,
    num_cpus: int | None,
    warnings: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> bool:
    """Join ``address`` / the job's cluster, or start an embedded Ray that listens on 127.0.0.1
    only; -> whether we started it. Warnings (a token file others can read) go to ``warnings``.
    An embedded Ray's processes start with ``env`` added to this process's environment (then
    actors need no runtime_env, and take the workers Ray starts ahead)."""
    import ray

    if ray.is_initialized():
        return False
    joining = bool(address or os.environ.get("RAY_ADDRESS"))
    msg = _check_token_file(create=not joining)
    if msg and warnings is not None:
        warnings.append(msg)
    if joining:
        try:
            ray.init(address=address, logging_level="WARNING")
        except ConnectionError as e:
            raise ConnectionError(_join_failed(str(e))) from None
        return True
    # "local": a new Ray even when `ray start` left one recorded on this machine. Ray turns a
    # loopback node address into the machine's outward one (and its services then listen on
    # every interface) unless it runs single-machine, as on macOS and Windows: that mode is
    # read while ray.init starts the node, so it is on for that call only.
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


def _check_token_file(create: bool) -> str | None:
    """Token authentication (Ray's default for a new local Ray unless ``RAY_AUTH_MODE`` says
    otherwise) with a token file only its owner can read: ``create`` makes a missing
    ``~/.ray/auth_token`` with mode 0600 (Ray would write it with the umask's, usually 0644);
    -> a one-line warning when an existing token file is readable by group or others."""
    auth_mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if auth_mode != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if create and not named:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # as `ray get-auth-token --generate`: 256 bits
            return None
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return (
            f"the Ray token file {path} is readable by group or others (mode {mode:04o}); "
            f"anyone who reads it can run code on this Ray: chmod 600 {path}"
        )
    return None


def worker_env() -> dict[str, str]:
    """Environment an actor starts with (Arrow reads it when it loads): Arrow's buffers from
    the C library's allocator, not mimalloc, unless this process names one: mimalloc gives
    the memory of a unit's Parquet writes back between units and faults it in again, a huge
    page at a time (docs/performance.md)."""
    return {"ARROW_DEFAULT_MEMORY_POOL": os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "system")}


def actor_class() -> type:
    """The actor class (imported here, not at the top: it imports torch and numba)."""
    from rlvr_ray.engine.actor import ScanActor

    return ScanActor


@dataclass
class Placement:
    """What each actor asks of Ray, and how many actors to start."""

    n_actors: int
    options: dict

    @classmethod
    def for_cluster(
        cls,
        out: str,
        n_units: int | None,
        workers: int | None,
        gpus_per_worker: float | None,
        memory_gb: float | None,
    ) -> Placement:
        import ray

        res = ray.cluster_resources()
        gpus = res.get("GPU", 0)
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus else 0.0
        opts: dict = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        if gpus_per_worker:
            n = workers or int(gpus / gpus_per_worker)
            opts["num_gpus"] = gpus_per_worker
        else:
            n = workers or int(res.get("CPU", 1))
            if memory_gb:  # as many actors as the cluster's memory holds, if fewer than CPUs
                n = min(n, int(res.get("memory", 0) / (memory_gb * 2**30)) or 1)
        if memory_gb:
            opts["memory"] = int(memory_gb * 2**30)
        # actor-level env_vars merge with the job's runtime_env (working_dir kept)
        opts["runtime_env"] = {"env_vars": worker_env() | storage_env(out) | source_env()}
        return cls(max(1, min(n, n_units or n)), opts)  # n_units None: not known yet


def _start_pool(
    out: str,
    n_units: int | None,
    address: str | None,
    num_cpus: int | None,
    workers: int | None,
    gpus_per_worker: float | None,
    memory_gb: float | None,
    warnings: list[str],
) -> tuple[bool, ActorPool]:
    """Start (or join) Ray and the pool's actors, which start importing torch and numba at
    once; -> (whether Ray was started here, the pool). ``n_units`` None: not known yet (the
    pool stops the actors it will not need when it is given the units)."""
    import ray

    # the env of an embedded Ray's processes; actors of a cluster get it as a runtime_env
    env = worker_env() | storage_env(out) | source_env()
    started = _init_ray(address, num_cpus, warnings, env)
    try:
        place = Placement.for_cluster(out, n_units, workers, gpus_per_worker, memory_gb)
        if started and not (address or os.environ.get("RAY_ADDRESS")):
            # an actor with its own runtime_env gets a new worker process (~1 s of CPU each)
            place.options.pop("runtime_env")
        threads = None if place.options.get("num_gpus") else 1
        args = (out, None, threads)
        return started, ActorPool(actor_class(), place.n_actors, place.options, args)
    except BaseException:
        if started:
            ray.shutdown()
        raise
