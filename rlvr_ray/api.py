"""The Python API: scan checkpoints and read the atlas from a notebook or a script.

    import rlvr_ray

    res = rlvr_ray.scan("sweep.yaml", out="results")  # a sweep file (or its dict)
    res = rlvr_ray.scan(base="ckpt/base", runs={"grpo": "ckpt/grpo", "sft:sft": "ckpt/sft"})
    res = rlvr_ray.scan(base="b", runs={"grpo": "ckpt/grpo"}, masters={"grpo": "ckpt/grpo-fp32"})
    con = rlvr_ray.open_atlas("results")  # a read-only DuckDB connection
    tbl = rlvr_ray.view("results", "run_sparsity")  # a pyarrow.Table
    df = rlvr_ray.view("results", "run_sparsity", as_="pandas")  # the pandas extra

``import rlvr_ray`` loads none of this; ``scan`` loads Ray, torch and numba when it is called.
Sweeps are validated as ``rlvr-ray scan`` validates them: a bad one raises ``SweepError`` with
the message the command prints.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

    from rlvr_ray.engine.config import Sweep
    from rlvr_ray.engine.driver import ScanResult

DEFAULT_OUT = "results"
FORMATS = {"arrow": None, "pandas": "pandas", "polars": "polars"}


def make_sweep(
    sweep: str | os.PathLike | Mapping | Sweep | None = None,
    *,
    base: str | os.PathLike | None = None,
    runs: Mapping[str, str | os.PathLike] | None = None,
    group: str = "default",
    params: Mapping[str, Any] | None = None,
    masters: Mapping[str, str | os.PathLike] | None = None,
) -> Sweep:
    """A validated sweep from a YAML path, a dict shaped like the YAML, a ``Sweep``, or ``base``
    with ``runs`` (``{"NAME[:ALGORITHM]": path}``, as the command's ``--run NAME=PATH``).
    ``masters`` (``{"NAME": path}``, as ``--master NAME=PATH``) names the fp32 master
    weights saved beside a run of ``runs``. ``params`` override the sweep's ``params``. Relative paths of a dict or of ``base``/``runs``
    are taken from the working directory, those of a file from the file's folder."""
    from rlvr_ray.engine.config import Sweep, SweepError, load_sweep, quick_run, sweep_from_dict

    if sweep is not None and (base is not None or runs or masters):
        raise SweepError("give a sweep or base= with runs=, not both")
    if sweep is None:
        if base is None or not runs:
            raise SweepError("scan needs a sweep, or base= with at least one run in runs=")
        masters = dict(masters or {})
        entries = [
            quick_run(spec, path, masters.pop(str(spec).partition(":")[0], None))
            for spec, path in runs.items()
        ]
        if masters:
            raise SweepError(f"masters: {sorted(masters)[0]!r} is not a run of runs=")
        data = {"groups": [{"name": group, "base": str(base), "runs": entries}]}
        return sweep_from_dict(
            {**data, "params": dict(params or {})}, Path.cwd(), "(base and runs)"
        )
    if isinstance(sweep, Sweep):
        loaded, root, source = sweep, Path.cwd(), "(sweep)"
    elif isinstance(sweep, Mapping):
        loaded = sweep_from_dict(dict(sweep), Path.cwd(), "(dict)")
        root, source = Path.cwd(), "(dict)"
    else:
        loaded = load_sweep(sweep)
        root, source = Path(sweep).parent.resolve(), str(sweep)
    if not params:
        return loaded
    merged = {**loaded.params.model_dump(), **params}
    groups = [g.model_dump() for g in loaded.groups]
    return sweep_from_dict({"groups": groups, "params": merged}, root, source)


def scan(
    sweep: str | os.PathLike | Mapping | Sweep | None = None,
    *,
    base: str | os.PathLike | None = None,
    runs: Mapping[str, str | os.PathLike] | None = None,
    group: str = "default",
    params: Mapping[str, Any] | None = None,
    masters: Mapping[str, str | os.PathLike] | None = None,
    out: str | os.PathLike = DEFAULT_OUT,
    address: str | None = None,
    workers: int | None = None,
    num_cpus: int | None = None,
    gpus_per_worker: float | None = None,
    memory_gb: float | None = None,
    unit_mb: int = 256,
    force: bool = False,
    progress: str | None = None,
    download: bool = False,
    executor: str | None = None,
) -> ScanResult:
    """Scan into the results directory ``out`` (a path or ``s3://`` URI), as ``rlvr-ray scan``.

    The sweep is given as in :func:`make_sweep`; the other arguments are the command's flags
    (``unit_mb``: ``--unit-mb``, ``download``: ``--download``, ``executor``: ``--executor``,
    ...). Returns the
    ``ScanResult``: ``errors`` lists the checkpoints that could not be scanned (the others
    are), ``exit_code`` is the command's.
    """
    from rlvr_ray.engine.driver import run_scan

    spec = make_sweep(sweep, base=base, runs=runs, group=group, params=params, masters=masters)
    if download:
        from rlvr_ray.engine.config import downloaded

        spec = downloaded(spec)
    return run_scan(
        spec,
        os.fspath(out),
        address=address,
        workers=workers,
        num_cpus=num_cpus,
        gpus_per_worker=gpus_per_worker,
        force=force,
        progress=progress,
        unit_bytes=unit_mb << 20,
        memory_gb=memory_gb,
        executor=executor,
    )


def open_atlas(out: str | os.PathLike = DEFAULT_OUT) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection to the atlas of ``out`` (object storage: to a local copy of
    the stored atlas, fetched when it changed). Raises FileNotFoundError when ``out`` holds no
    results."""
    from rlvr_ray.io import catalog

    return catalog.connect(os.fspath(out))


def view(out: str | os.PathLike, name: str, as_: str = "arrow"):
    """The table or view ``name`` of the atlas of ``out``, whole, as a ``pyarrow.Table``
    (``as_="arrow"``), a pandas DataFrame (``"pandas"``) or a polars DataFrame (``"polars"``);
    pandas and polars are optional: the ``pandas`` and ``polars`` extras."""
    if as_ not in FORMATS:
        raise ValueError(f"as_={as_!r}: expected one of {', '.join(FORMATS)}")
    module = FORMATS[as_]
    if module and importlib.util.find_spec(module) is None:
        raise ImportError(f"view(as_={as_!r}) needs {module}: pip install 'rlvr-ray[{module}]'")
    con = open_atlas(out)
    try:
        names = [
            n for (n,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        ]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{out}: no table or view {name!r} in the atlas ({hint}SHOW TABLES lists them)"
            )
        rel = con.table(name)
        if as_ == "pandas":
            return rel.df()
        if as_ == "polars":
            return rel.pl()
        return rel.fetch_arrow_table()
    finally:
        con.close()
