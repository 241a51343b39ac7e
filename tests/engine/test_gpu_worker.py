"""A whole scan on a CUDA device against the same scan on the CPU (skipped without one).

Counts, profiles, consistency and maps must be identical; geometry must agree to the accuracy
the float64 reference checks state (``tests/stats/test_gpu.py``).
"""

import pytest
import torch

from .tablecmp import assert_same_tables, scan_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_scan_equals_cpu_scan(qwen_family, tmp_path):
    cpu = scan_tables(qwen_family, tmp_path / "cpu", "cpu")
    gpu = scan_tables(qwen_family, tmp_path / "gpu", "cuda")
    worst = assert_same_tables(cpu, gpu)
    assert worst["nss"] < 1e-6 and worst["max_angle_right"] < 1e-6
    print("largest relative GPU-CPU differences:", {k: f"{v:.1e}" for k, v in worst.items()})
