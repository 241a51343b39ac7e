"""The statuses of a tensors row, and which of them mean the copies were compared.

Plain data (no pyarrow), so the CLI's quick paths can use it; ``rlvr_ray.io.schema`` re-exports
it.
"""

#: tensors.status -> meaning (also in the README's table docs)
STATUSES = {
    "ok": "compared",
    "vocab_resized": "first dimension differs (resized vocabulary): the common rows compared",
    "missing_in_run": "tensor not in the run",
    "missing_in_base": "tensor in the run but not in the base",
    "shape_mismatch": "shapes differ beyond the first dimension; not compared",
    "unsupported_dtype": "not a float tensor; not compared",
    "dtype_mismatch": "FP8 in one copy, another dtype (or FP8 format) in the other; not compared",
    "empty": "the base's tensor has no elements (a 0 in its shape); nothing to compare or read",
    "nonfinite": "NaN or Inf in base or run; not compared",
    "read_error": "the tensor's bytes could not be read",
}
#: the statuses of a tensors row whose copies were compared (its statistics are findings)
COMPARED = ("ok", "vocab_resized")
#: SQL conditions: a tensors row whose copies were (were not) compared
COMPARED_SQL = f"status IN ({', '.join(repr(s) for s in COMPARED)})"
NOT_COMPARED_SQL = COMPARED_SQL.replace(" IN ", " NOT IN ")
