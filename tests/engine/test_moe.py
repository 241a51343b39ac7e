"""Mixture-of-experts checkpoints written by transformers 5: gpt-oss's fused expert tensors are
compared one expert matrix at a time (rows, cols, profiles, stripes and consistency per expert,
against numpy on that expert's slice), per-expert tensors (Qwen3-MoE) carry their expert id,
and every tensor of the checkpoints is compared."""

import json
import shutil

import numpy as np
import pytest
import torch
from moe_checkpoints import save_family
from safetensors.torch import load, save_file

from .test_worker import np_gini, np_mask, read_mode, scan  # noqa: F401

N_EXPERTS = 4


def planted_runs(base, root, seed: int, plant) -> dict:
    """Runs of a saved checkpoint: ``plant(rng, name, uint16 patterns) -> 0/1 mask`` picks the
    coordinates moved by one bf16 ULP (away from zero) in each run."""
    tensors = load_file(base / "model.safetensors")
    runs = {}
    for i, run in enumerate(["rl-a", "rl-b"]):
        rng = np.random.default_rng(seed + i)
        out = {}
        for name, t in tensors.items():
            bits = t.view(torch.int16).numpy().view(np.uint16).copy()
            m = plant(rng, name, bits) & ((bits & 0x7FFF) != 0)
            bits[m] += 1
            out[name] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        (root / run).mkdir()
        shutil.copy(base / "config.json", root / run / "config.json")
        save_file(out, str(root / run / "model.safetensors"), metadata={"format": "pt"})
        runs[run] = root / run
    return runs


def load_file(path) -> dict:
    return load((path).read_bytes())


def bits_of(path) -> dict:
    return {
        k: v.view(torch.int16).numpy() for k, v in load_file(path / "model.safetensors").items()
    }


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """gpt-oss (fused experts) base and two runs: in ``gate_up_proj`` of layer 0 the runs
    change expert 1 in a band of rows and expert 3 in a band of columns (other experts: a
    sprinkle); elsewhere 10% of coordinates."""
    root = tmp_path_factory.mktemp("gpt_oss")
    base = save_family("gpt_oss", root / "base", seed=1)

    def plant(rng, name, bits):
        m = rng.random(bits.shape) < 0.1
        if name == "model.layers.0.mlp.experts.gate_up_proj":
            m = rng.random(bits.shape) < 0.02
            m[1, 8:20] |= rng.random(m[1, 8:20].shape) < 0.7  # expert 1: rows 8-19
            m[3, :, 5:9] |= rng.random(m[3, :, 5:9].shape) < 0.6  # expert 3: columns 5-8
        return m

    return base, planted_runs(base, root, 11, plant)


def test_fused_experts_compared_per_expert(gpt_oss, tmp_path):
    base, runs = gpt_oss
    con, _, plan = scan(tmp_path, base, runs)
    b0 = bits_of(base)
    bits = {r: bits_of(p) for r, p in runs.items()}
    # coverage: every tensor of both runs compared, a fused expert tensor as 4 expert rows
    rows = con.execute("SELECT run, tensor, expert, status FROM tensors").fetchall()
    fused = [n for n, b in b0.items() if ".mlp.experts." in n]
    assert len(fused) == 8 and all(b0[n].shape[0] == N_EXPERTS for n in fused)
    assert len(rows) == 2 * (len(b0) - len(fused) + N_EXPERTS * len(fused))
    assert {s for *_, s in rows} == {"ok"}
    assert sorted((r, t, e) for r, t, e, _ in rows) == sorted(
        (r, n, e) for r in runs for n in b0 for e in (range(N_EXPERTS) if n in fused else [None])
    )
    got = con.execute(
        "SELECT run, tensor, expert, role, layer, rows, cols, numel, n_changed, stripe_row, "
        "stripe_col FROM tensors WHERE tensor LIKE '%experts%'"
    ).fetchall()
    for run, tensor, e, role, layer, nrows, ncols, numel, n_changed, s_row, s_col in got:
        w0, w1 = b0[tensor][e], bits[run][tensor][e]  # the expert's own matrix (or vector)
        m = np_mask(w0, w1).reshape(-1, w0.shape[-1]) if w0.ndim == 1 else np_mask(w0, w1)
        assert role == ("bias" if tensor.endswith("_bias") else tensor.split(".")[-1][:-5])
        assert layer == int(tensor.split(".")[2])
        assert (nrows, ncols, numel) == (m.shape[0], m.shape[1], m.size)
        assert n_changed == int(m.sum())
        if w0.ndim == 2:
            assert s_row == pytest.approx(np_gini(m.mean(1)), rel=1e-9)
            assert s_col == pytest.approx(np_gini(m.mean(0)), rel=1e-9)
        else:
            assert s_row is None and s_col is None
    # the planted bands are where they were put: stripes of one expert, not of the stack
    name = "model.layers.0.mlp.experts.gate_up_proj"
    for e, axis in [(1, "row"), (3, "col")]:
        m = np_mask(b0[name][e], bits["rl-a"][name][e])
        ratios = con.execute(
            f"SELECT ratio FROM profiles WHERE run = 'rl-a' AND tensor = '{name}' AND expert = {e}"
            f" AND axis = '{axis}' ORDER BY idx"
        ).fetchall()
        want = m.mean(1 if axis == "row" else 0)
        np.testing.assert_allclose([r[0] for r in ratios], want.astype(np.float32))
        band = slice(8, 20) if axis == "row" else slice(5, 9)
        assert want[band].min() > 0.4 > np.delete(want, np.r_[band]).max()
    # consistency per expert matrix: how many coordinates exactly c runs changed
    cons = con.execute(
        f"SELECT expert, n_runs, consensus_counts FROM consistency WHERE tensor = '{name}' "
        "ORDER BY expert"
    ).fetchall()
    assert [c[0] for c in cons] == list(range(N_EXPERTS))
    for e, n_runs, counts in cons:
        c = sum(np_mask(b0[name][e], bits[r][name][e]).astype(int) for r in runs)
        assert n_runs == 2 and counts == np.bincount(c.ravel(), minlength=3).tolist()
    # maps too: one per run and expert
    ((n_maps,),) = con.execute(
        f"SELECT count(*) FROM maps WHERE tensor = '{name}' AND kind = 'mask'"
    ).fetchall()
    assert n_maps == 2 * N_EXPERTS


def test_per_expert_tensors_carry_their_expert_id(tmp_path):
    """Qwen3-MoE as transformers saves it: one tensor per expert, its id in the expert column,
    every tensor compared."""
    base = save_family("qwen3_moe", tmp_path / "base", seed=2)
    runs = planted_runs(base, tmp_path, 5, lambda rng, name, bits: rng.random(bits.shape) < 0.1)
    con, _, _ = scan(tmp_path, base, runs)
    rows = con.execute(
        "SELECT run, tensor, expert, role, status, n_changed FROM tensors"
    ).fetchall()
    b0 = bits_of(base)
    assert len(rows) == 2 * len(b0) and {r[4] for r in rows} == {"ok"}
    for run, tensor, expert, role, _, n_changed in rows:
        parts = tensor.split(".")
        want = int(parts[parts.index("experts") + 1]) if "experts" in parts else None
        assert expert == want
        if want is not None:
            assert role == parts[-2].removesuffix("_proj")
        assert n_changed == int(np_mask(b0[tensor], bits_of(runs[run])[tensor]).sum())
    assert json.loads((base / "config.json").read_text())["model_type"] == "qwen3_moe"


def test_qwen2_moe_shared_expert_gate_is_a_router_row_with_no_decomposition(tmp_path):
    """Qwen2-MoE as transformers saves it: its shared expert's projections take their roles, and
    the shared expert's gate ([1, hidden]) is a router, compared, and not decomposed (rank 1:
    no k can be below it), while the matrices beside it are."""
    from rlvr_ray.engine.config import Params

    base = save_family("qwen2_moe", tmp_path / "base", seed=3)
    runs = planted_runs(base, tmp_path, 7, lambda rng, name, bits: rng.random(bits.shape) < 0.2)
    con, _, _ = scan(tmp_path, base, {"rl-a": runs["rl-a"]}, params=Params())
    rows = con.execute(
        "SELECT tensor, role, status, geometry_status, n_changed, rows, cols FROM tensors "
        "WHERE tensor LIKE '%shared_expert%' ORDER BY tensor"
    ).fetchall()
    b0, b1 = bits_of(base), bits_of(runs["rl-a"])
    layer = "model.layers.0.mlp."
    want = {
        f"{layer}shared_expert.down_proj.weight": ("down", "ok"),
        f"{layer}shared_expert.gate_proj.weight": ("gate", "ok"),
        f"{layer}shared_expert.up_proj.weight": ("up", "ok"),
        f"{layer}shared_expert_gate.weight": ("router", "skipped_vector"),
    }
    assert [r[0] for r in rows] == sorted(want)
    for tensor, role, status, geometry, n, r, c in rows:
        assert (role, status, geometry) == (*want[tensor][:1], "ok", want[tensor][1])
        assert n == int(np_mask(b0[tensor], b1[tensor]).sum()) > 0
        assert (r, c) == b0[tensor].shape
    assert b0[f"{layer}shared_expert_gate.weight"].shape == (1, 64)
