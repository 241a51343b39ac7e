"""Tied and untied output heads: a run that stores ``lm_head`` against a base that ties it to
its embedding (and the reverse) is compared through the tied embedding, not skipped.

Checkpoints are real Qwen2 layouts at Qwen2.5-1.5B's widths (hidden 1536, intermediate 8960,
12 heads, 2 KV heads; one layer, a 1024-token vocabulary to keep the files small), written by
transformers' save_pretrained: a tied base stores no ``lm_head.weight``.
"""

import json

import duckdb
import numpy as np
import pytest
import torch
from safetensors import safe_open

from rlvr_ray.engine.config import Group, Params, Run, sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.engine.plan import RunSpec, plan_group
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io.checkpoint import open_checkpoint

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def qwen2_config(tied: bool):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=1024,
        tie_word_embeddings=tied,
    )


def bump(w: torch.Tensor, density: float, gen: torch.Generator) -> None:
    """Move a random ``density`` share of bf16 weights ``w`` by one ULP, in place."""
    mask = torch.rand(w.shape, generator=gen) < density
    bits = w.data.view(torch.int16)
    bits[mask] += 1


def save(model, path) -> None:
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)


def bits(path, name) -> np.ndarray:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(name).view(torch.int16).numpy()


def n_changed(b0: np.ndarray, b1: np.ndarray) -> int:
    """Bitwise-different bf16 patterns, +0 and -0 counting as equal."""
    return int(((b0 != b1) & (((b0 | b1) & 0x7FFF) != 0)).sum())


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """base_tied (no lm_head saved), run_untied (lm_head = moved embedding, saved untied),
    run_tied (tied again, its embedding moved)."""
    from transformers import Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("heads")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tied = Qwen2ForCausalLM(qwen2_config(True)).to(torch.bfloat16)
    save(tied, root / "base_tied")
    untied = Qwen2ForCausalLM(qwen2_config(False)).to(torch.bfloat16)
    untied.load_state_dict({**tied.state_dict(), HEAD: tied.state_dict()[EMBED].clone()})
    bump(untied.lm_head.weight, 0.3, gen)
    bump(untied.model.embed_tokens.weight, 0.1, gen)
    bump(untied.model.layers[0].self_attn.q_proj.weight, 0.2, gen)
    save(untied, root / "run_untied")
    bump(tied.model.embed_tokens.weight, 0.05, gen)
    save(tied, root / "run_tied")
    return root


def scan(root, base: str, runs: list[str], out):
    """Plan one group and run its units in-process (no Ray) -> (unit reports, DuckDB over the
    tensors parts)."""
    cks = [
        (RunSpec(r, str(root / r), ck.fingerprint), ck)
        for r in runs
        for ck in [open_checkpoint(str(root / r))]
    ]
    group = Group(
        name="g", base=str(root / base), runs=[Run(name=r, checkpoint=str(root / r)) for r in runs]
    )
    plan = plan_group(
        group, open_checkpoint(str(root / base)), cks, Params(geometry=False), 1 << 28
    )
    worker = ScanWorker(str(out))
    reports = [worker.run_unit(u) for u in plan.units]
    con = duckdb.connect()
    con.execute(
        f"CREATE VIEW tensors AS SELECT * FROM read_parquet('{out}/tables/tensors/*.parquet')"
    )
    return reports, con


def skipped(reports) -> list[str]:
    return [s for rep in reports for s in rep["skipped"]]


def test_the_layouts_are_what_transformers_writes(heads):
    with safe_open(str(heads / "base_tied" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert HEAD not in names and EMBED in names
    with safe_open(str(heads / "run_untied" / "model.safetensors"), "pt") as f:
        assert f.get_slice(HEAD).get_shape() == [1024, 1536]
        assert f.get_slice("model.layers.0.mlp.gate_proj.weight").get_shape() == [8960, 1536]


def test_untied_run_head_is_compared_with_the_tied_base_embedding(heads, tmp_path):
    reports, con = scan(heads, "base_tied", ["run_untied"], tmp_path / "out")
    assert skipped(reports) == []
    got = con.execute(
        "SELECT status, base_tensor, run_tensor, numel, run_numel, n_changed FROM tensors "
        "WHERE tensor = ?",
        [HEAD],
    ).fetchall()
    want = n_changed(bits(heads / "base_tied", EMBED), bits(heads / "run_untied", HEAD))
    assert want > 0.29 * 1024 * 1536
    assert got == [("ok", EMBED, None, 1024 * 1536, 1024 * 1536, want)]
    embed = con.execute("SELECT base_tensor, n_changed FROM tensors WHERE tensor = ?", [EMBED])
    assert embed.fetchall() == [
        (None, n_changed(bits(heads / "base_tied", EMBED), bits(heads / "run_untied", EMBED)))
    ]


def test_tied_run_head_is_its_embedding_against_an_untied_base(heads, tmp_path):
    reports, con = scan(heads, "run_untied", ["run_tied"], tmp_path / "out")
    assert skipped(reports) == []
    got = con.execute(
        "SELECT status, base_tensor, run_tensor, n_changed FROM tensors WHERE tensor = ?", [HEAD]
    ).fetchall()
    want = n_changed(bits(heads / "run_untied", HEAD), bits(heads / "run_tied", EMBED))
    assert got == [("ok", None, EMBED, want)]


def test_a_base_whose_config_unties_a_missing_head_still_reports_it(heads, tmp_path):
    """No stand-in when the config says the head is not tied: the head is missing."""
    base = tmp_path / "base_broken"
    base.mkdir()
    (base / "model.safetensors").symlink_to(heads / "base_tied" / "model.safetensors")
    cfg = json.loads((heads / "base_tied" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    (tmp_path / "run_untied").symlink_to(heads / "run_untied")
    reports, con = scan(tmp_path, "base_broken", ["run_untied"], tmp_path / "out")
    msg = f"tensor {HEAD} is in run run_untied but not in the base"
    assert skipped(reports) == [f"run_untied/{HEAD}: missing_in_base: {msg}"]


@pytest.mark.slow
def test_a_scan_of_both_pairings_exits_clean(heads, tmp_path, ray_local):
    sweep = {
        "groups": [
            {
                "name": "tied-base",
                "base": str(heads / "base_tied"),
                "runs": [{"name": "untied", "checkpoint": str(heads / "run_untied")}],
            },
            {
                "name": "untied-base",
                "base": str(heads / "run_untied"),
                "runs": [{"name": "tied", "checkpoint": str(heads / "run_tied")}],
            },
        ],
        "params": {"geometry": False},
    }
    res = run_scan(sweep_from_dict(sweep, tmp_path), str(tmp_path / "out"))
    assert (res.exit_code, res.skipped, res.errors) == (0, [], [])
    con = duckdb.connect(str(tmp_path / "out" / "atlas.duckdb"), read_only=True)
    got = con.execute(
        "SELECT group_name, base_tensor, run_tensor FROM tensors WHERE tensor = ? "
        "ORDER BY group_name",
        [HEAD],
    ).fetchall()
    assert got == [("tied-base", EMBED, None), ("untied-base", None, EMBED)]


def test_a_tied_runs_totals_count_its_embedding_once_whatever_runs_sit_beside_it(heads, tmp_path):
    """A tied run beside an untied one gets a head row (its embedding against the base's tied
    embedding: the untied run's head is a tensor of the group), but its totals in run_sparsity
    are over the tensors it stores, each once, as when it is scanned alone."""
    from rlvr_ray.io import catalog

    def totals(runs: list[str], out) -> dict:
        sweep = {
            "groups": [
                {
                    "name": "g",
                    "base": str(heads / "base_tied"),
                    "runs": [{"name": r, "checkpoint": str(heads / r)} for r in runs],
                }
            ],
            "params": {"geometry": False},
        }
        res = run_scan(sweep_from_dict(sweep, tmp_path), str(out), executor="local")
        assert (res.exit_code, res.skipped, res.errors) == (0, [], [])
        _, rows = catalog.query(
            out,
            "SELECT run, n_tensors, numel, n_changed, sparsity, coverage, tensor_coverage, "
            "n_tensors_all, run_numel FROM run_sparsity ORDER BY run",
        )
        return {r[0]: r[1:] for r in rows}

    alone = totals(["run_tied"], tmp_path / "alone")
    both = totals(["run_tied", "run_untied"], tmp_path / "both")
    assert both["run_tied"] == alone["run_tied"]
    with safe_open(str(heads / "run_tied" / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    assert HEAD not in names
    numel = sum(bits(heads / "run_tied", n).size for n in names)
    changed = sum(
        n_changed(bits(heads / "base_tied", n), bits(heads / "run_tied", n)) for n in names
    )
    assert changed > 0.04 * 1024 * 1536
    want = (len(names), numel, changed, 1 - changed / numel, 1.0, 1.0, len(names), numel)
    assert alone["run_tied"] == pytest.approx(want, rel=1e-15)
    # the untied run's head is its own tensor: counted
    assert both["run_untied"][0] == len(names) + 1
    con = catalog.connect(tmp_path / "both")
    got = con.execute(
        "SELECT run, run_tensor, n_changed FROM tensors WHERE tensor = ? ORDER BY run", [HEAD]
    ).fetchall()
    con.close()
    assert got == [
        (
            "run_tied",
            EMBED,
            n_changed(bits(heads / "base_tied", EMBED), bits(heads / "run_tied", EMBED)),
        ),
        (
            "run_untied",
            None,
            n_changed(bits(heads / "base_tied", EMBED), bits(heads / "run_untied", HEAD)),
        ),
    ]
