"""Headline views that show what they stand on: coverage per run (and the CLI's warning),
group_summary's run count, cross-family rows kept apart per base, fused projections lined up.

One scan of three groups: a qwen2-shaped base with four runs (one with a tensor that cannot be
compared, two with a resized vocabulary), another qwen2-shaped base with one run, and a Phi-3
checkpoint (fused qkv_proj / gate_up_proj, written by transformers) with one run. Its units are
run in-process by the scan worker, then ``rlvr-ray scan`` finds them done (no Ray needed),
writes the scan's tables, builds the atlas and prints its summary.
"""

import contextlib
import io
import math

import duckdb
import numpy as np
import pytest
import torch
import yaml

from rlvr_ray.cli import main
from rlvr_ray.engine.config import load_sweep
from rlvr_ray.engine.driver import _open_group
from rlvr_ray.engine.plan import plan_group
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.lab.planted import planted_family, write_checkpoint

UP1 = "model.layers.1.mlp.up_proj.weight"


def load_bits(path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    return {k: v.view(torch.int16).numpy() for k, v in tensors.items()}


def np_changed(b0: np.ndarray, b1: np.ndarray) -> int:
    return int(((b0 != b1) & (((b0 | b1) & 0x7FFF) != 0)).sum())


def phi3(root):
    """A Phi-3 base and a run moving 20% of its weights by one ULP, saved by transformers."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
    )
    model = Phi3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "phi3-base", safe_serialization=True)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        bits = p.data.view(torch.int16)
        bits[torch.rand(p.shape, generator=gen) < 0.2] += 1
    model.save_pretrained(root / "phi3-run", safe_serialization=True)
    return root / "phi3-base", root / "phi3-run"


PHI_DOWN0 = "model.layers.0.mlp.down_proj.weight"


def lacking_a_tensor(src, dest, name: str):
    """A copy of the checkpoint ``src`` without tensor ``name`` (as a trainer that dropped it)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    (dest / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def scanned(qwen_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("coverage")
    fam = qwen_family
    gap = dict(fam.bits["grpo-b"])
    gap[UP1] = gap[UP1][:, :16].copy()  # shape_mismatch: not compared
    runs = {"full": fam.runs["grpo-a"], "gap": write_checkpoint(root / "gap", gap, "qwen2", 2)}
    for name, src in [("vocab1", "dapo"), ("vocab2", "grpo-a")]:
        b = dict(fam.bits[src])
        for t in ("model.embed_tokens.weight", "lm_head.weight"):  # 96 -> 98 rows
            b[t] = np.concatenate([b[t], b[t][:2]])
        runs[name] = write_checkpoint(root / name, b, "qwen2", 2)
    other = planted_family(root / "other", "qwen2", layers=2, seed=7, runs={"grpo": 0.3})
    phi_base, phi_run = phi3(root)
    lacking = lacking_a_tensor(phi_run, root / "phi3-lacking", PHI_DOWN0)
    sweep = {
        "groups": [
            {
                "name": "g",
                "base": str(fam.base),
                "runs": [{"name": n, "checkpoint": str(p)} for n, p in runs.items()],
            },
            {
                "name": "other",
                "base": str(other.base),
                "runs": [{"name": "grpo", "checkpoint": str(other.runs["grpo"])}],
            },
            {
                "name": "phi3",
                "base": str(phi_base),
                "runs": [{"name": "run", "checkpoint": str(phi_run)}],
            },
            {
                "name": "phi3-lacking",
                "base": str(phi_base),
                "runs": [{"name": "lacking", "checkpoint": str(lacking)}],
            },
        ],
        "params": {"geometry": False},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    worker = ScanWorker(str(root / "out"))
    for group in load_sweep(root / "sweep.yaml").groups:  # the units `scan` plans (--unit-mb 256)
        base, runs = _open_group(group, [])
        for unit in plan_group(
            group, base, runs, load_sweep(root / "sweep.yaml").params, 256 << 20
        ).units:
            worker.run_unit(unit)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        main(["scan", str(root / "sweep.yaml"), "--out", str(root / "out"), "--progress", "quiet"])
    return root, fam, gap, other, err.getvalue()


def test_scan_and_summary_warn_once_per_run_below_99_percent(scanned, capsys):
    root, fam, gap, _, scan_err = scanned
    out = str(root / "out")
    total = sum(v.size for v in gap.values())
    cov = (total - gap[UP1].size) / total
    n = len(gap)
    warning = (
        f"rlvr-ray: warning: group g, run gap: only {math.floor(cov * 1000) / 10:.1f}% "
        f"of the model's weights were compared ({n - 1} of {n} tensors); see SELECT tensor, "
        "status, message FROM tensors WHERE group_name = 'g' AND run = 'gap' AND status "
        "NOT IN ('ok', 'vocab_resized')"
    )
    # a run lacking a tensor of its base: that tensor's weights were not compared either
    phi = load_bits(root / "phi3-base")
    phi_total = sum(v.size for v in phi.values())
    cov_lacking = (phi_total - phi[PHI_DOWN0].size) / phi_total
    lacking = (
        f"rlvr-ray: warning: group phi3-lacking, run lacking: only "
        f"{math.floor(cov_lacking * 1000) / 10:.1f}% of the model's weights were compared "
        f"({len(phi) - 1} of {len(phi)} tensors); see SELECT tensor, status, message FROM tensors "
        "WHERE group_name = 'phi3-lacking' AND run = 'lacking' AND status NOT IN ('ok', "
        "'vocab_resized')"
    )
    assert [x for x in scan_err.splitlines() if "warning:" in x] == [warning, lacking]
    assert main(["summary", "--out", out]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [warning, lacking]
    assert "coverage" in captured.out.splitlines()[2]
    con = duckdb.connect(str(root / "out" / "atlas.duckdb"), read_only=True)
    got = con.execute(
        "SELECT coverage, tensor_coverage, run_numel FROM run_sparsity WHERE run = 'gap'"
    ).fetchone()
    assert got == (pytest.approx(cov, rel=1e-12), (n - 1) / n, total)
    cov_vocab = con.execute("SELECT coverage FROM summary WHERE run = 'vocab1'").fetchone()[0]
    base_total = sum(v.size for v in fam.bits["base"].values())
    want = 1 - 2 * 2 * 32 / (base_total + 2 * 2 * 32)  # 2 rows x 2 x 32
    assert cov_vocab == pytest.approx(want, rel=1e-15)
    got = con.execute(
        "SELECT coverage, tensor_coverage, run_numel, numel_all, numel FROM run_sparsity "
        "WHERE run = 'lacking'"
    ).fetchone()
    kept = phi_total - phi[PHI_DOWN0].size
    n = len(phi)
    assert got == (pytest.approx(cov_lacking, rel=1e-15), (n - 1) / n, kept, phi_total, kept)
    status = con.execute(
        "SELECT status, run_numel, base_numel FROM tensors WHERE run = 'lacking' AND tensor = ?",
        [PHI_DOWN0],
    ).fetchone()
    assert status == ("missing_in_run", None, phi[PHI_DOWN0].size)
    full = con.execute("SELECT coverage, tensor_coverage FROM run_sparsity WHERE run = 'full'")
    assert full.fetchone() == (1.0, 1.0)


def test_group_summary_counts_the_groups_runs(scanned):
    root = scanned[0]
    con = duckdb.connect(str(root / "out" / "atlas.duckdb"), read_only=True)
    per_tensor = con.execute(
        "SELECT DISTINCT n_runs FROM consistency WHERE group_name = 'g' ORDER BY 1"
    ).fetchall()
    # the resized embedding and head were compared in 2 runs, the gap run's up_proj in 3
    assert per_tensor == [(2,), (3,), (4,)]
    got = con.execute("SELECT group_name, n_runs FROM group_summary ORDER BY 1").fetchall()
    assert got == [("g", 4)]  # the other groups have one run: no pairwise Jaccard


def test_cross_family_keeps_bases_apart_and_lines_up_fused_projections(scanned):
    root, fam, _, other, _ = scanned
    con = duckdb.connect(str(root / "out" / "atlas.duckdb"), read_only=True)
    bases = con.execute(
        "SELECT count(DISTINCT base_fingerprint) FROM cross_family WHERE family = 'qwen2'"
    ).fetchone()
    assert bases == (2,)
    runs = con.execute(
        "SELECT DISTINCT base_ref, n_runs FROM cross_family WHERE family = 'qwen2' "
        "AND role = 'q' ORDER BY n_runs"
    ).fetchall()
    assert runs == [(str(other.base), 1), (str(fam.base), 4)]
    # the pooled qkv cell of layer 0 of the other base: q, k and v weights (biases are 'bias')
    names = [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    b0, b1 = other.bits["base"], other.bits["grpo"]
    want = sum(np_changed(b0[t], b1[t]) for t in names) / sum(b0[t].size for t in names)
    got = con.execute(
        "SELECT update_density, pooled FROM cross_family WHERE base_ref = ? "
        "AND role = 'qkv' AND depth_bin = 0",
        [str(other.base)],
    ).fetchall()
    assert got == [(pytest.approx(want, rel=1e-12), True)]
    sim = {
        (a, b): n
        for a, b, n in con.execute(
            "SELECT base_a, base_b, n_cells FROM cross_family_similarity"
        ).fetchall()
    }
    phi = str(root / "phi3-base")
    # two qwen2 bases: 9 roles (norm q k v o gate up down bias) x 2 depth bins, pooled cells not
    # repeated; Phi-3 vs either: norm, qkv, o, gate_up, down x 2 bins
    want = {(phi, str(fam.base)): 10, (phi, str(other.base)): 10}
    a, b = sorted([str(fam.base), str(other.base)])
    assert {k: v for k, v in sim.items() if phi in k} == want
    assert sum(v for k, v in sim.items() if phi not in k) == 18 and len(sim) == 3
    assert a != b
