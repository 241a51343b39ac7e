"""The probes a scan's own process skips (rlvr_ray.probes): pyarrow's look for pandas and
numba's for SciPy's BLAS find nothing there, and what does use those libraries still works after
(pyarrow's pandas conversions, numba's np.dot); Arrow allocates with malloc there unless the
user chose its allocator; a process that is not the scan's (a notebook's) is left alone. Each
case runs in a fresh interpreter: the probes happen once per process."""

import os
import subprocess
import sys

import pytest

from rlvr_ray.probes import OWN_PROCESS_ENV

pytest.importorskip("pandas")
pytest.importorskip("scipy")

OWN = """
import gc, sys
from rlvr_ray.probes import own_process, settled
OWN
held = not gc.isenabled()
settled()
gc_after = (gc.isenabled(), gc.get_freeze_count() > 0)
import pyarrow as pa
t = pa.Table.from_pylist([{"a": 1, "b": "x"}, {"a": 2, "b": None}])
pandas_after_rows = "pandas" in sys.modules
from rlvr_ray.stats import kernels
kernels.warm()
blas_after_kernels = "scipy.linalg" in sys.modules
df = t.to_pandas()  # pandas imports when it is asked for
import numpy as np, numba
dot = numba.njit(lambda a, b: np.dot(a, b))(np.ones(3), np.arange(3.0))  # SciPy's BLAS, now
print(pandas_after_rows, blas_after_kernels, list(df["a"]), bool(df["b"].isna()[1]), dot,
      "scipy.linalg" in sys.modules, pa.default_memory_pool().backend_name, held, *gc_after)
"""


def _run(own: bool, pool: str | None = None) -> str:
    code = OWN.replace("OWN", "own_process()" if own else "")
    # not inherited from this process (a scan run in it by another test marks it)
    mine = (OWN_PROCESS_ENV, "ARROW_DEFAULT_MEMORY_POOL")
    env = {k: v for k, v in os.environ.items() if k not in mine}
    if pool is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = pool
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_a_scans_own_process_skips_both_probes_and_keeps_pandas_and_blas_working():
    # the garbage collector is held until settled(), then on again over frozen objects
    assert _run(own=True) == "False False [1, 2] True 3.0 True system True True True"


def test_any_other_process_is_left_alone():
    out = _run(own=False).split()
    assert out[:6] == ["True", "True", "[1,", "2]", "True", "3.0"] and out[6] == "True"
    assert out[7] != "system"  # Arrow's own default pool (mimalloc or jemalloc)
    assert out[8:] == ["False", "True", "False"]  # never held, nothing frozen


def test_an_allocator_the_user_chose_is_kept():
    assert _run(own=True, pool="mimalloc").split()[7] == "mimalloc"
