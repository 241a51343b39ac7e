"""rlvr-ray: a parameter-space atlas of fine-tuning.

Measures where RL (GRPO, DAPO, PPO, ...) and SFT moved a base model's bf16 weights, per tensor,
across many runs and families, on Ray actors; writes Parquet and aggregates with DuckDB.

Layers (imports point one way only): ``rlvr_ray.stats`` (torch; numba kernels on CPU) <-
``rlvr_ray.io`` (checkpoints, tables, catalog) <- ``rlvr_ray.engine`` (plan, workers, driver) <-
``rlvr_ray.cli``.
"""

__version__ = "0.1.0"
