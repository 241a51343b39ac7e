"""The tiny lab: real HF bf16 checkpoints, a valid sweep, fp32 masters, caching, determinism."""

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from rlvr_ray.engine.config import Group, step_pair_groups
from rlvr_ray.lab import build, cli
from rlvr_ray.lab.settings import lab_settings

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Path:
    """The tiny preset for all three architectures (a few seconds)."""
    out = tmp_path_factory.mktemp("lab")
    build.build_lab(out, preset="tiny", log=lambda _: None, jobs=2)  # two processes
    return out


def _header(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118


def test_sweep_names_existing_checkpoints_with_labels(lab):
    sweep = yaml.safe_load((lab / "sweep.yaml").read_text())
    assert [g["name"] for g in sweep["groups"]] == ["qwen2-lab", "llama-lab", "mistral-lab"]
    for group in sweep["groups"]:
        assert (lab / group["base"] / "model.safetensors").is_file()
        names = [r["name"] for r in group["runs"]]
        assert len(names) == len(set(names)) == 5 * 3
        algos = {r["algorithm"] for r in group["runs"]}
        assert algos == {"grpo", "dapo", "reinforce++", "sft"}
        for r in group["runs"]:
            assert (lab / r["checkpoint"] / "config.json").is_file()
            assert r["checkpoint"].endswith(f"step-{r['step']:04d}")
            # every saved step comes with its fp32 master (the scan's precision gate)
            assert r["master"] == r["checkpoint"].replace("/step-", "/master_fp32/step-")
            assert (lab / r["master"] / "model.safetensors").is_file()
            final = "@" not in r["name"]
            assert r["consistency"] == (final and r["algorithm"] != "sft")
            assert r["name"] == (r["series"] if final else f"{r['series']}@{r['step']}")
        # every run's consecutive saved steps are compared (k-step sparsity)
        assert group["step_pairs"] is True
        pairs = [g.name for g in step_pair_groups(Group.model_validate(group))]
        assert len(pairs) == 5 * 2 and f"{group['name']}/steps/grpo-s1/1-2" in pairs
        assert {r["dataset"] for r in group["runs"] if r["algorithm"] == "grpo"} == {
            "arith-a",
            "arith-b",
        }


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_checkpoints_are_bf16_hf_directories(lab, arch):
    config = json.loads((lab / arch / "base" / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] is False
    assert config["head_dim"] >= 16
    for ckpt in [lab / arch / "base", lab / arch / "runs" / "grpo-s2" / "step-0003"]:
        dtypes = _header(ckpt)
        assert set(dtypes.values()) == {"BF16"}
        assert "lm_head.weight" in dtypes and "model.embed_tokens.weight" in dtypes
        assert "model.layers.0.self_attn.q_proj.weight" in dtypes
        assert ("model.layers.0.self_attn.q_proj.bias" in dtypes) == (arch == "qwen2")


def test_fp32_masters_round_to_the_bf16_checkpoints(lab):
    run = lab / "qwen2" / "runs" / "grpo-s1"
    for step in ("step-0001", "step-0002", "step-0003"):
        assert set(_header(run / "master_fp32" / step).values()) == {"F32"}
        with (
            safe_open(str(run / "master_fp32" / step / "model.safetensors"), "pt") as fm,
            safe_open(str(run / step / "model.safetensors"), "pt") as fb,
        ):
            for k in fm.keys():  # noqa: SIM118
                assert torch.equal(fm.get_tensor(k).to(torch.bfloat16), fb.get_tensor(k))


def test_runs_start_from_the_bf16_base_and_move(lab):
    with (
        safe_open(str(lab / "llama" / "base" / "model.safetensors"), "pt") as fb,
        safe_open(
            str(lab / "llama" / "runs" / "sft-s5" / "step-0003" / "model.safetensors"), "pt"
        ) as fr,
    ):
        changed = sum(int((fb.get_tensor(k) != fr.get_tensor(k)).sum()) for k in fb.keys())  # noqa: SIM118
    assert changed > 0


def test_curves_and_logs(lab):
    curve = json.loads((lab / "mistral" / "curves" / "dapo-s3.json").read_text())["points"]
    assert [p["step"] for p in curve] == [0, 1, 2, 3]
    assert all(0.0 <= p["mean_reward"] <= 1.0 for p in curve[1:])
    assert all(p["accuracy"] is not None for p in curve)
    log = json.loads((lab / "mistral" / "runs" / "dapo-s3" / "train_log.json").read_text())
    assert log["algorithm"] == "dapo" and log["saved_steps"] == [1, 2, 3]


def test_second_build_is_cached(lab):
    sweep = lab / "sweep.yaml"
    before = {p: p.stat().st_mtime_ns for p in lab.rglob("*.safetensors")}
    t0 = time.perf_counter()
    assert build.build_lab(lab, preset="tiny") == sweep
    assert time.perf_counter() - t0 < 1.0
    assert {p: p.stat().st_mtime_ns for p in lab.rglob("*.safetensors")} == before


def test_cached_build_writes_the_sweep_this_code_names(lab):
    """A lab built before its sweep asked for step pairs gains them without retraining."""
    sweep = lab / "sweep.yaml"
    current = sweep.read_text()
    old = yaml.safe_load(current)
    for group in old["groups"]:
        del group["step_pairs"]
    sweep.write_text(yaml.safe_dump(old, sort_keys=False))
    assert build.build_lab(lab, preset="tiny") == sweep
    assert sweep.read_text() == current


def test_same_settings_give_identical_bytes(lab, tmp_path):
    """... whether the families trained in parallel processes (the fixture) or in this one."""
    build.build_lab(tmp_path, preset="tiny", archs=("llama",), log=lambda _: None, jobs=1)
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "llama").rglob("*.safetensors"))
    assert len(files) == 1 + 5 * 3 + 5 * 3  # base, 5 runs x 3 steps, and their fp32 masters
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (lab / rel).read_bytes(), rel


def test_changed_settings_rebuild_and_remove_old_outputs(tmp_path):
    build.build_lab(
        tmp_path, preset="tiny", archs=("mistral",), rl_steps=1, sft_steps=1, log=lambda _: None
    )
    build.build_lab(
        tmp_path, preset="tiny", archs=("qwen2",), rl_steps=1, sft_steps=1, log=lambda _: None
    )
    assert not (tmp_path / "mistral").exists() and (tmp_path / "qwen2" / "base").is_dir()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["archs"] == ["qwen2"]


def test_cli_subcommand_reuses_the_cached_build(lab, capsys):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", "--out", str(lab), "--preset", "tiny"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(lab / "sweep.yaml")
    bad = parser.parse_args(["lab", "--out", str(lab), "--archs", "gpt2"])
    assert bad.func(bad) == 2


def test_importing_the_lab_does_not_import_transformers():
    code = "import sys, rlvr_ray.lab, rlvr_ray.lab.cli; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow  # a scan of 15 runs and 10 step pairs
def test_scan_of_the_lab_sweep_measures_the_gate_on_its_masters(lab, tmp_path, ray_local):
    """The lab's sweep names every step's fp32 master: the scan's run_precision_gate matches
    the lab's own whole-checkpoint count (``summarize_lab``) for every run and step."""
    import duckdb

    from rlvr_ray.engine.config import load_sweep
    from rlvr_ray.engine.driver import run_scan
    from rlvr_ray.lab.summary import summarize_lab

    sweep = load_sweep(lab / "sweep.yaml")
    qwen = sweep.model_copy(update={"groups": sweep.groups[:1]})
    res = run_scan(qwen, str(tmp_path / "out"), workers=2)
    assert res.exit_code == 0 and not [w for w in res.warnings if "precision gate" in w]
    con = duckdb.connect(str(tmp_path / "out" / "atlas.duckdb"), read_only=True)
    got = con.execute(
        "SELECT run, numel, n_moved, erased_share, n_round_mismatch, n_tensors, n_tensors_all "
        "FROM run_precision_gate WHERE group_name = 'qwen2-lab'"
    ).fetchall()
    want = summarize_lab(lab)["qwen2-lab"]
    assert sorted(r[0] for r in got) == sorted(want)
    for run, numel, moved, erased, mismatch, n, n_all in got:
        assert n == n_all and mismatch == 0  # every tensor counted; checkpoint = bf16(master)
        assert moved / numel == pytest.approx(want[run]["moved_fp32"], abs=5e-5)
        assert erased == pytest.approx(want[run]["erased_of_moved"], abs=5e-5)
    # step pairs are scanned without masters
    pairs = con.execute(
        "SELECT count(*) FROM precision_gate_all WHERE contains(group_name, '/steps/')"
    ).fetchone()
    assert pairs == (0,)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="auto is cuda on this machine")


@NO_CUDA
def test_device_cpu_gives_the_default_builds_bytes(lab, tmp_path):
    """``--device cpu`` trains the same checkpoints, curves and cache key as the default (auto,
    which is the CPU here): the device reaches every tensor without changing a byte."""
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["lab", "--out", str(tmp_path), "--preset", "tiny", "--archs", "llama", "--jobs", "1"]
    args = parser.parse_args([*argv, "--device", "cpu"])
    assert args.func(args) == 0
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "llama").rglob("*.safetensors"))
    assert len(files) == 1 + 5 * 3 + 5 * 3
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (lab / rel).read_bytes(), rel
    for rel in ["llama/curves/pretrain.json", "llama/curves/grpo-s1.json"]:
        assert (tmp_path / rel).read_text() == (lab / rel).read_text(), rel
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["device"] == "cpu"
    # a CPU build keeps the cache key it had before the lab knew devices; CUDA's differs
    s = lab_settings("tiny", archs=("llama",))
    blob = json.dumps({"code": build.CODE_VERSION, "settings": s.to_dict()}, sort_keys=True)
    assert manifest["key"] == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert build.settings_key(s, "cuda") != manifest["key"]


@NO_CUDA
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path):
    out = tmp_path / "lab"
    argv = ["-m", "rlvr_ray.cli", "lab", "--preset", "tiny", "--device", "cuda", "--out", str(out)]
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == (
        "rlvr-ray lab: error: device cuda: CUDA is not available (torch was built without "
        "CUDA); use --device cpu or auto\n"
        if torch.version.cuda is None
        else "rlvr-ray lab: error: device cuda: CUDA is not available (no CUDA device found); "
        "use --device cpu or auto\n"
    )
    assert r.stdout == "" and not out.exists()
