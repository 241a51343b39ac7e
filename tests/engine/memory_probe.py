"""Peak memory of the real ScanWorker scanning one group, in a fresh process.

    python -m tests.engine.memory_probe '{"base": ..., "runs": {...}, "params": {...}, "out": ...}'

prints {"peak": bytes, "estimate": bytes}: the process's peak resident memory (VmHWM) while it
scans every unit, above its resident memory once the imports, the worker's start (numba
kernels loaded) and the checkpoint headers are done (the peak is reset there through
/proc/self/clear_refs), and the driver's estimate for the unit's largest tensor.
"""

from __future__ import annotations

import json
import sys

from rlvr_ray.engine.config import Group, Params, Run
from rlvr_ray.engine.memory import tensor_memory
from rlvr_ray.engine.plan import RunSpec, plan_group
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io.checkpoint import open_checkpoint


def status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(cfg: dict) -> dict:
    runs = cfg["runs"]
    cks = [
        (RunSpec(n, p, open_checkpoint(p).fingerprint), open_checkpoint(p)) for n, p in runs.items()
    ]
    group = Group(
        name="g", base=cfg["base"], runs=[Run(name=n, checkpoint=p) for n, p in runs.items()]
    )
    params = Params(**cfg.get("params", {}))
    plan = plan_group(group, open_checkpoint(cfg["base"]), cks, params, 1 << 40)
    worker = ScanWorker(cfg["out"], device="cpu")
    if params.geometry:  # the worker imports torch for the first SVD: library code, not scan
        import torch  # noqa: F401  (memory: counted before the baseline, as numba's is)
    estimate = max(
        tensor_memory(t, len(u.runs) + 1, u.params) for u in plan.units for t in u.tensors
    )
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident memory starts again from here
    baseline = status("VmRSS")
    for u in plan.units:
        worker.run_unit(u)
    return {"peak": status("VmHWM") - baseline, "estimate": estimate}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
