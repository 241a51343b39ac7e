"""rlvr-ray: a parameter-space atlas of fine-tuning.

Measures where RL (GRPO, DAPO, PPO, ...) and SFT moved a base model's bf16 weights, per tensor,
across many runs and families, on Ray actors; writes Parquet and aggregates with DuckDB.

Layers (imports point one way only): ``rlvr_ray.stats`` (torch; numba kernels on CPU) <-
``rlvr_ray.io`` (checkpoints, tables, catalog) <- ``rlvr_ray.engine`` (plan, workers, driver) <-
``rlvr_ray.cli``; ``rlvr_ray.probes`` (the third-party import probes a scan's own processes
skip) imports none of them.

The Python API (``rlvr_ray.api``), loaded on first use so that ``import rlvr_ray`` stays light:

    rlvr_ray.scan(sweep_or_dict, out="results")  # or scan(base=..., runs={"grpo": path})
    rlvr_ray.open_atlas("results")  # a read-only DuckDB connection
    rlvr_ray.view("results", "run_sparsity", as_="arrow")  # or "pandas", "polars"
"""

__version__ = "0.1.0"
__all__ = ["make_sweep", "open_atlas", "scan", "view"]


def __getattr__(name: str):
    if name in __all__:
        from rlvr_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlvr_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
