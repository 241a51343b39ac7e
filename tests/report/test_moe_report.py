"""The report's per-layer figures on a mixture of experts: gpt-oss, whose fused expert tensors
are one row per expert, has its layer drawn with one expert (named), never the experts stacked
over each other in one panel."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pytest
import torch
from moe_checkpoints import save_family
from pagelib import decode_png
from safetensors.torch import load, save_file

from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.report.data import detail_tensors
from rlvr_ray.report.html import render

FUSED_DOWN = "model.layers.1.mlp.experts.down_proj"


def planted_run(base, dest, density: float, seed: int):
    """A copy of ``base`` with ``density`` of the nonzero weights moved one bf16 ULP; expert
    e of the fused down projection moves (e + 1) times as many, so every expert differs."""
    tensors = load((base / "model.safetensors").read_bytes())
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in tensors.items():
        bits = t.view(torch.int16).numpy().view(np.uint16).copy()
        p = np.full(bits.shape, density)
        if name == FUSED_DOWN:
            p = p * (1 + np.arange(bits.shape[0]))[:, None, None]
        m = (rng.random(bits.shape) < p) & ((bits & 0x7FFF) != 0)
        bits[m] += 1
        out[name] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    dest.mkdir()
    shutil.copy(base / "config.json", dest / "config.json")
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def moe_results(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("moe-report")
    base = save_family("gpt_oss", root / "base", seed=3)
    runs = {
        "grpo": planted_run(base, root / "grpo", 0.05, 1),
        "sft": planted_run(base, root / "sft", 0.2, 2),
    }
    sweep = {
        "groups": [
            {
                "name": "oss",
                "base": str(base),
                "runs": [
                    {"name": n, "checkpoint": str(p), "algorithm": n} for n, p in runs.items()
                ],
            }
        ],
        "params": {"geometry": False},
    }
    out = root / "results"
    res = run_scan(sweep_from_dict(sweep, root), str(out), num_cpus=2)
    assert res.exit_code == 0 and not res.errors, res
    return out


def test_detail_figures_draw_one_expert(moe_results):
    con = duckdb.connect(str(moe_results / "atlas.duckdb"), read_only=True)
    n_experts = con.execute(
        "SELECT count(DISTINCT expert) FROM tensors WHERE tensor = ?", [FUSED_DOWN]
    ).fetchone()[0]
    detail = detail_tensors(con, "oss", 1)
    con.close()
    assert n_experts == 4
    # attention has no experts; the MLP down projection is experts only: expert 0 stands for it
    assert [(r, e) for r, _, e in detail] == [
        ("q", None),
        ("k", None),
        ("v", None),
        ("o", None),
        ("down", 0),
    ]
    assert detail[-1][1] == FUSED_DOWN
    maps = {s.key: s for s in render(moe_results, layer=1)[1]}["maps"]
    [img] = maps.images
    decode_png(img.png)
    assert f"{FUSED_DOWN}#0" in img.meta["sizes"]
    assert not any(k.startswith(FUSED_DOWN) and k != f"{FUSED_DOWN}#0" for k in img.meta["sizes"])
    assert img.caption.endswith(" MoE: down (expert 0) shown, the other experts are not.")
