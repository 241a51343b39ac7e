"""The precision gate in a scan: runs given an fp32 master (``master:``) get precision_gate rows,
counted against a numpy float64 reference; a run without one gets none; a bad master (missing,
not F32, another shape, a tensor missing) is a status and one warning line, not a failure.
"""

from __future__ import annotations

import hashlib
import json

import duckdb
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlvr_ray.engine import gate as engine_gate
from rlvr_ray.engine import plan
from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.engine.plan import RunSpec, plan_group
from rlvr_ray.io.checkpoint import open_checkpoint
from rlvr_ray.io.schema import GATE_BIN_EDGES
from rlvr_ray.lab.planted import (
    bf16_bits_to_f64,
    f32_to_bf16_bits,
    random_base,
    tensor_shapes,
    write_checkpoint,
)
from rlvr_ray.report.data import scope
from rlvr_ray.report.precision import precision

Q = "model.layers.0.self_attn.q_proj.weight"


def reference(bits0: np.ndarray, bits1: np.ndarray, master: np.ndarray) -> dict:
    """The gate's counts in numpy float64: the ULP on the master's side from the exponent."""
    v0, v1 = bf16_bits_to_f64(bits0), bf16_bits_to_f64(bits1)
    m = master.astype(np.float64)
    moved = m != v0
    _, e = np.frexp(np.abs(v0))
    gap = np.ldexp(1.0, np.maximum(e - 1, -126) - 7)
    toward = (v0 != 0) & (np.sign(m - v0) != np.sign(v0))
    power = (np.abs(v0) == np.ldexp(1.0, e - 1)) & (e - 1 > -126)
    gap = np.where(v0 == 0, 2.0**-133, np.where(toward & power, gap / 2, gap))
    ratio = (np.abs(m - v0) / (gap / 2))[moved]
    hist = np.bincount(np.searchsorted(GATE_BIN_EDGES[1:], ratio, side="right"), minlength=8)
    return {
        "numel": bits0.size,
        "n_moved": int(moved.sum()),
        "n_erased": int((moved & (v1 == v0)).sum()),
        "n_below": int((ratio < 1).sum()),
        "n_ties": int((ratio == 1).sum()),
        "gate_hist": hist.tolist(),
    }


def write_master(path, tensors: dict[str, np.ndarray], dtype=torch.float32) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 1}))
    state = {k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()}
    save_file(state, str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and runs whose masters moved every coordinate by a random share of a ULP
    (``scale``: its typical size in half ULPs), plus a run without a master and bad masters."""
    root = tmp_path_factory.mktemp("gate")
    rng = np.random.default_rng(3)
    base = {k: random_base(s, rng) for k, s in tensor_shapes("qwen2", 1).items()}
    write_checkpoint(root / "base", base, "qwen2", 1)
    data = {"base": base}
    for name, scale in (("grpo", 0.6), ("sft", 8.0), ("plain", 0.6), ("bad", 0.6)):
        masters, run = {}, {}
        for k, b in base.items():
            v0 = bf16_bits_to_f64(b)
            step = np.abs(v0) * 2.0**-8 * scale * rng.standard_normal(b.shape)
            step[rng.random(b.shape) < 0.2] = 0  # some coordinates never move
            masters[k] = (v0 + step).astype(np.float32)
            run[k] = f32_to_bf16_bits(masters[k])
        write_checkpoint(root / name, run, "qwen2", 1)
        write_master(root / f"{name}-fp32", masters)
        data[name] = (run, masters)
    # the bad run's masters: q is [rows - 1, cols], k is missing, v is bf16
    run, masters = data["bad"]
    odd = {k: v for k, v in masters.items() if "k_proj.weight" not in k}
    odd[Q] = odd[Q][:-1]
    write_master(root / "bad-fp32", {k: v for k, v in odd.items() if "v_proj.weight" not in k})
    v = "model.layers.0.self_attn.v_proj.weight"
    save_file({v: torch.from_numpy(masters[v]).to(torch.bfloat16)}, str(root / "v.safetensors"))
    # safetensors directories hold one model: the bf16 v goes into a shard of its own
    (root / "bad-fp32" / "model-v.safetensors").write_bytes((root / "v.safetensors").read_bytes())
    return root, data


def _sweep(root, masters: dict[str, str]) -> dict:
    runs = []
    for n in ("grpo", "sft", "plain", "bad"):
        runs.append({"name": n, "checkpoint": n, "algorithm": "sft" if n == "sft" else "grpo"})
        if n in masters:
            runs[-1]["master"] = masters[n]
    return {"groups": [{"name": "g", "base": "base", "runs": runs}]}


@pytest.fixture(scope="module")
def scanned(family, tmp_path_factory, ray_local):
    """The family scanned with the masters of grpo, sft and bad (plain has none)."""
    root, _ = family
    masters = {"grpo": "grpo-fp32", "sft": "sft-fp32", "bad": "bad-fp32"}
    sweep = sweep_from_dict(_sweep(root, masters), root)
    out = tmp_path_factory.mktemp("gate-out")
    res = run_scan(sweep, str(out), workers=2)
    assert not res.errors and res.exit_code == 0 and not res.warnings
    return out


def test_scan_with_masters(family, scanned):
    root, data = family
    con = duckdb.connect(str(scanned / "atlas.duckdb"), read_only=True)
    cols = "numel, n_moved, n_erased, n_below, n_ties, gate_hist"
    for run in ("grpo", "sft"):
        bits1, master = data[run]
        got = con.execute(
            f"SELECT tensor, status, {cols}, erased_share, master FROM precision_gate "
            "WHERE run = ? ORDER BY tensor",
            [run],
        ).fetchall()
        assert [r[0] for r in got] == sorted(data["base"])
        for tensor, status, *counts, share, ref in got:
            want = reference(data["base"][tensor], bits1[tensor], master[tensor])
            assert status == "ok" and ref == str(root / f"{run}-fp32")
            assert dict(zip(cols.split(", "), counts, strict=True)) == want, (run, tensor)
            assert share == want["n_erased"] / want["n_moved"]
    # the checkpoint is bf16(master): what was erased is what moved less than half a ULP and
    # the ties that round to the base (none planted at random)
    summary = con.execute(
        "SELECT run, erased_share, below_share, n_round_mismatch FROM run_precision_gate "
        "WHERE n_tensors > 0 ORDER BY run"
    ).fetchall()
    assert [r[0] for r in summary] == ["bad", "grpo", "sft"]
    for _, erased, below, mismatch in summary:
        assert erased == below and mismatch == 0
    by_run = dict((r[0], r[1]) for r in summary)
    assert by_run["grpo"] > 0.5 > by_run["sft"] > 0  # small moves are mostly erased
    # a run without a master has no rows
    assert con.execute("SELECT count(*) FROM precision_gate WHERE run = 'plain'").fetchone() == (0,)
    # the bad master: a status per tensor it cannot serve, the rest counted
    bad = dict(
        con.execute(
            "SELECT tensor, status || ': ' || coalesce(message, '') FROM precision_gate "
            "WHERE run = 'bad' AND status <> 'ok'"
        ).fetchall()
    )
    m = root / "bad-fp32"
    assert bad == {
        Q: f"master_shape_mismatch: master {m}, tensor {Q}: shape [31, 32] vs the run's [32, 32]",
        "model.layers.0.self_attn.k_proj.weight": f"missing_in_master: master {m}, tensor "
        "model.layers.0.self_attn.k_proj.weight: not in the master",
        "model.layers.0.self_attn.v_proj.weight": f"master_not_f32: master {m}, tensor "
        "model.layers.0.self_attn.v_proj.weight: dtype BF16, expected F32",
    }
    # the tensors table is the same as without masters
    n = con.execute("SELECT count(*) FROM tensors WHERE status = 'ok'").fetchone()[0]
    assert n == 4 * len(data["base"])


def test_missing_master_is_one_warning_and_a_status(family, tmp_path, ray_local):
    """A master path that does not exist: the scan goes on (exit 0), one warning line names it,
    and the run's rows say master_error."""
    root, _ = family
    sweep = sweep_from_dict(_sweep(root, {"grpo": "nowhere-fp32"}), root)
    res = run_scan(sweep, str(tmp_path / "out"), workers=1)
    assert res.exit_code == 0 and not res.errors
    missing = root / "nowhere-fp32"
    assert res.warnings == [
        f"group g: run grpo: no precision gate: checkpoint {missing}: path {missing} does not exist"
    ]
    con = duckdb.connect(str(tmp_path / "out" / "atlas.duckdb"), read_only=True)
    statuses = con.execute("SELECT DISTINCT status, n_moved FROM precision_gate").fetchall()
    assert statuses == [("master_error", None)]
    assert con.execute("SELECT count(*) FROM tensors WHERE status = 'ok'").fetchone()[0] > 0


def test_windowed_reads_count_the_same(family, monkeypatch):
    """The worker's gate read a few rows at a time gives the counts of one read."""
    root, _ = family
    sweep = sweep_from_dict(_sweep(root, {"sft": "sft-fp32"}), root)
    group = sweep.groups[0]
    base = open_checkpoint(group.base)
    runs = []
    for r in group.runs:
        ck = open_checkpoint(r.checkpoint)
        runs.append((RunSpec(r.name, ck.ref, ck.fingerprint, master=r.master), ck))
    units = plan_group(group, base, runs, sweep.params, 1 << 30).units
    unit, spec = next((u, t) for u in units for t in u.tensors if t.name == Q)
    whole = engine_gate.PrecisionGate().table(unit, spec, base, [c for _, c in runs])
    monkeypatch.setattr(engine_gate, "WINDOW_NUMEL", 3 * 32)
    windows = list(engine_gate._windows((32, 32), 32, None))
    assert len(windows) == 11 and windows[-1] == (30, 32)
    windowed = engine_gate.PrecisionGate().table(unit, spec, base, [c for _, c in runs])
    assert windowed.num_rows == 1 and windowed.equals(whole)


def test_report_compares_rl_and_sft_erased_shares(family, scanned):
    """The report's figure pools final checkpoints per class: RL (grpo and bad's counted
    tensors) against SFT, its caption stating each erased share."""
    root, data = family
    con = duckdb.connect(str(scanned / "atlas.duckdb"), read_only=True)
    sec = precision(con, scope(con))
    [img] = [i for i in sec.images if i.name == "precision-masters"]
    counted = {"grpo": set(data["base"]), "sft": set(data["base"])}
    counted["bad"] = set(data["base"]) - {
        Q,
        *(Q.replace("q_proj", x) for x in ("k_proj", "v_proj")),
    }
    pooled = {}
    for run, cls in (("grpo", "RL"), ("bad", "RL"), ("sft", "SFT")):
        bits1, master = data[run]
        for t in counted[run]:
            want = reference(data["base"][t], bits1[t], master[t])
            p = pooled.setdefault(cls, np.zeros(2 + 8, dtype=np.int64))
            p += [want["n_moved"], want["n_erased"], *want["gate_hist"]]
    assert img.meta["hist"] == {c: p[2:].tolist() for c, p in pooled.items()}
    for cls, runs in (("RL", 2), ("SFT", 1)):
        share = pooled[cls][1] / pooled[cls][0]
        assert img.meta["erased"][cls] == share
        assert (
            f"{cls}: {100 * share:.1f}% of {pooled[cls][0]:,} master moves erased by bf16 "
            f"rounding ({runs} runs)" in img.caption
        )
    table = next(t for t in sec.tables if t.id == "gate-table")
    assert [r[1] for r in table.rows] == ["bad", "grpo", "sft"]


def test_step_pairs_leave_masters_out_and_masters_name_a_new_scan(family):
    """A step pair's base is step t, not the master's start: its run has no master. A master
    changes the scan id (its rows are new); no master keeps the id a scan had before."""
    root, _ = family
    data = _sweep(root, {"grpo": "grpo-fp32"})
    for r, step in zip(data["groups"][0]["runs"], (1, 2, 3, 4), strict=True):
        r |= {"series": "s", "step": step}
    data["groups"][0]["step_pairs"] = True
    sweep = sweep_from_dict(data, root)
    pairs = sweep.scan_groups()[1:]
    assert len(pairs) == 3 and all(r.master is None for g in pairs for r in g.runs)
    base = open_checkpoint(str(root / "base"))
    ck = open_checkpoint(str(root / "grpo"))
    ids = []
    for master in (None, str(root / "grpo-fp32")):
        run = RunSpec("grpo", ck.ref, ck.fingerprint, master=master)
        ids.append(plan_group(sweep.groups[0], base, [(run, ck)], sweep.params, 1 << 30).scan_id)
    run = RunSpec("grpo", ck.ref, ck.fingerprint)
    key = {  # the scan id's key without the master
        "schema": plan.schema_hash(),
        "plan": plan.plan_hash(),
        "group": "g",
        "base": base.fingerprint,
        "unit_bytes": 1 << 30,
        "runs": [[run.name, run.fingerprint, run.labels(), run.consistency]],
        "params": sweep.params.model_dump(),
    }
    before = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    assert ids[0] == before != ids[1]
