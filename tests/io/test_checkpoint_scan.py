"""Valid but unusual tensors through a whole scan on a real local Ray: an F8_E8M0 scale (MXFP8
checkpoints carry them) and a zero-element [2^40, 0] tensor each get a row with their status;
every other tensor is compared as if they were not there."""

import shutil

import duckdb
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan

SCALE = "model.layers.0.mlp.down_proj.weight_scale"  # one F8_E8M0 exponent per 32 inputs
EMPTY = "model.layers.1.mlp.experts_bias"  # no elements, a huge first dimension


def with_extra_tensors(src, dst, seed: int):
    """A copy of checkpoint ``src`` whose model.safetensors also holds SCALE and EMPTY."""
    d = shutil.copytree(src, dst)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = f.metadata()
    exps = np.random.default_rng(seed).integers(100, 140, size=(32, 2), dtype=np.uint8)
    tensors[SCALE] = torch.from_numpy(exps).view(torch.float8_e8m0fnu)
    tensors[EMPTY] = torch.empty((2**40, 0), dtype=torch.bfloat16)
    save_file(tensors, str(d / "model.safetensors"), metadata=metadata)
    return d


def np_changed(base: np.ndarray, run: np.ndarray) -> int:
    """Bitwise-changed bf16 coordinates, +0 and -0 counting as unchanged."""
    return int(((base != run) & (((base | run) & 0x7FFF) != 0)).sum())


def test_f8_e8m0_and_empty_tensors_get_rows_the_rest_is_compared(llama_family, tmp_path, ray_local):
    base = with_extra_tensors(llama_family.base, tmp_path / "base", 1)
    run = with_extra_tensors(llama_family.runs["grpo"], tmp_path / "grpo", 2)
    group = {"name": "g", "base": str(base), "runs": [{"name": "grpo", "checkpoint": str(run)}]}
    sweep = {"groups": [group]}
    out = tmp_path / "out"
    res = run_scan(sweep_from_dict(sweep, tmp_path), str(out))
    assert res.errors == []  # both checkpoints opened
    assert res.exit_code == 3  # two tensors were not compared, and the exit status says so
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    query = "SELECT tensor, status, n_changed, numel, rows, message FROM tensors"
    rows = {t: rest for t, *rest in con.execute(query).fetchall()}
    status, _, _, _, message = rows.pop(SCALE)
    assert status == "unsupported_dtype" and "F8_E8M0" in message
    empty = f"checkpoint {base}, tensor {EMPTY}: shape [1099511627776, 0] is empty"
    assert rows.pop(EMPTY) == ["empty", None, 0, None, empty]
    bits = llama_family.bits
    assert {t: tuple(r[:3]) for t, r in rows.items()} == {
        t: ("ok", np_changed(b, bits["grpo"][t]), b.size) for t, b in bits["base"].items()
    }
    assert sorted(res.skipped) == sorted(
        [f"grpo/{EMPTY}: empty: {empty}", f"grpo/{SCALE}: unsupported_dtype: base dtype F8_E8M0"]
    )
