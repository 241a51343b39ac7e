"""Imports that third-party libraries make to probe for optional others, which a scan's own
processes (the ``rlvr-ray scan`` command, the scan actors) skip. Each probe imports a library a
scan never uses, where it is installed, on the scan's critical path:

- pyarrow imports pandas (~0.2 s) the first time it converts a Python list, to look for pandas
  objects in it;
- numba's first compile or cache load imports SciPy's BLAS bindings (``scipy.linalg``,
  0.15-0.2 s) to know whether ``np.correlate`` / ``np.convolve`` can call BLAS.

:func:`own_process` has each library look once with the other unimportable, so it finds none:
pyarrow's pandas conversions (``to_pandas``, ``from_pandas``) still import pandas when called,
and numba's ``np.dot`` still imports SciPy when compiled; numba's ``np.correlate`` and
``np.convolve`` use its plain loop instead of BLAS in that process. A library's caller (a
notebook) is not such a process: nothing here runs there. :func:`own_process` also has Arrow
allocate with malloc there, and holds the garbage collector until the process is set up
(:func:`settled`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading

#: set in a scan's own process (inherited by the processes it starts): the kernels' first
#: load skips numba's BLAS probe
OWN_PROCESS_ENV = "RLVR_RAY_OWN_PROCESS"

_lock = threading.Lock()
#: own_process() turned the garbage collector off until settled()
_gc_held = False


class _Unimportable:
    """An import finder under which the top-level packages ``names`` cannot be found."""

    def __init__(self, *names: str):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@contextlib.contextmanager
def _without(*names: str):
    blocker = _Unimportable(*names)
    with _lock:
        sys.meta_path.insert(0, blocker)
        try:
            yield
        finally:
            sys.meta_path.remove(blocker)


def own_process() -> None:
    """Mark this process as a scan's own, have Arrow allocate with malloc, as the scan actors
    do (``$ARROW_DEFAULT_MEMORY_POOL``, unless set; call this before pyarrow is imported), hold
    the garbage collector until :func:`settled`, and have pyarrow probe for pandas now,
    finding none (see the module's docstring). Arrow's default pool (mimalloc) gives a unit's
    buffers back to the system and faults them in again for the next one, zeroing huge pages
    (a 1.5B pair's scan in-process: 0.96x the wall time with malloc, 8 runs side by side)."""
    global _gc_held
    os.environ[OWN_PROCESS_ENV] = "1"
    if gc.isenabled():
        # the imports make objects that live as long as the process, and the collector went
        # over them again and again: ~300 collections, 0.1 s of a 1.5B pair's 2 s scan
        gc.disable()
        _gc_held = True
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    with _without("pandas"):
        pa.array([0])  # pyarrow looks for pandas once per process, here


def settled() -> None:
    """The scan's own process is set up (its modules imported, its worker made): what exists
    now lives as long as the process, so the garbage collector, turned on again, leaves it
    alone (``gc.freeze``). Nothing where :func:`own_process` did not turn it off."""
    global _gc_held
    if _gc_held:
        _gc_held = False
        gc.freeze()
        gc.enable()


def numba_without_blas_probe() -> None:
    """In a scan's own process, import numba's array math (which the kernels' first load
    imports) with SciPy unimportable, so its BLAS probe finds none; elsewhere nothing."""
    if os.environ.get(OWN_PROCESS_ENV) != "1" or "numba.np.arraymath" in sys.modules:
        return
    if "scipy.linalg" in sys.modules:  # already paid for
        return
    with _without("scipy"):
        import numba.np.arraymath  # noqa: F401
