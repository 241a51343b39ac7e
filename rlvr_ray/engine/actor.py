"""The scan actor: a :class:`~rlvr_ray.engine.worker.ScanWorker` whose unit reports say where
they ran (node, process). Imported only where actors are made (it imports torch and numba), so
that planning a scan does not."""

from __future__ import annotations

import os

from rlvr_ray.engine.plan import Unit
from rlvr_ray.engine.worker import ScanWorker


class ScanActor(ScanWorker):
    def __init__(self, *args, **kwargs):
        from rlvr_ray.probes import own_process

        own_process()  # an actor's process is the scan's own: no pandas or SciPy imported
        super().__init__(*args, **kwargs)

    def run_unit(self, unit: Unit) -> dict:
        import ray

        rep = super().run_unit(unit)
        return rep | {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
