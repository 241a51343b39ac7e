"""Bad input caught early or skipped alone: sweep errors name their field once, a run may not be
called ``base``, a missing local path stops the scan before Ray starts (exit 2, nothing
created), and a checkpoint that breaks in any way while it is opened or planned is one line
while the rest of the sweep is scanned (the real CLI in a subprocess, a real local Ray)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from faultlib import expected_changed

from rlvr_ray.engine.config import SweepError, sweep_from_dict
from rlvr_ray.lab.planted import planted_family

CLI = str(Path(sys.executable).parent / "rlvr-ray")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _error(data: dict) -> str:
    with pytest.raises(SweepError) as e:
        sweep_from_dict(data, Path("/x"), "s.yaml")
    return str(e.value)


def test_sweep_errors_name_each_field_once():
    run = {"name": "bad name", "checkpoint": "r"}
    assert _error({"groups": [{"name": "g", "base": "b", "runs": [run]}]}) == (
        "sweep s.yaml: groups.0.runs.0.name: run name 'bad name' must match "
        "^[A-Za-z0-9][A-Za-z0-9._@+=-]*$"
    )
    assert _error({"groups": [{"name": "g", "runs": [{"name": "a", "checkpoint": "r"}]}]}) == (
        "sweep s.yaml: groups.0.base: Field required"
    )
    assert _error({"groups": [{"name": "g", "base": "b", "runs": []}]}) == (
        "sweep s.yaml: groups.0.runs: Tuple should have at least 1 item after validation, not 0"
    )


def test_a_run_named_base_is_refused():
    runs = [{"name": "grpo", "checkpoint": "r1"}, {"name": "base", "checkpoint": "r2"}]
    assert _error({"groups": [{"name": "g", "base": "b", "runs": runs}]}) == (
        "sweep s.yaml: groups.0.runs.1.name: run name 'base' is reserved for the group's base "
        "checkpoint"
    )


def test_missing_local_paths_stop_before_ray_and_create_nothing(qwen_family, tmp_path):
    out = tmp_path / "results"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "base": str(qwen_family.base),
                        "runs": [
                            {"name": "grpo", "checkpoint": str(qwen_family.runs["grpo-a"])},
                            {"name": "typo", "checkpoint": "runs/grpo-typo"},
                        ],
                    },
                    {
                        "name": "h",
                        "base": "bases/nope",
                        "runs": [{"name": "a", "checkpoint": "hf://o/n"}],
                    },
                ]
            }
        )
    )
    t0 = time.monotonic()
    p = _cli("scan", str(sweep), "--out", str(out))
    assert p.returncode == 2, p.stderr
    assert p.stderr == (
        f"rlvr-ray: error: no such checkpoint: group g: run typo: "
        f"{tmp_path}/runs/grpo-typo; group h: base: {tmp_path}/bases/nope\n"
    )
    assert p.stdout == "" and not out.exists()
    assert time.monotonic() - t0 < 15  # no Ray was started (an embedded Ray alone takes longer)


def _bad_config(root: Path, fam, name: str, config: bytes | str) -> Path:
    d = root / name
    shutil.copytree(fam.base, d)
    (d / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    return d


@pytest.mark.slow  # ~25 s: one CLI scan of three groups with its own Ray
def test_each_broken_checkpoint_is_one_line_and_the_sweep_goes_on(tmp_path):
    fams = {
        g: planted_family(tmp_path / g, "qwen2", layers=1, seed=i, runs={"grpo": 0.2, "dapo": 0.3})
        for i, g in enumerate(("alpha", "mixed", "gamma"))
    }
    mixed, bad = fams["mixed"], tmp_path / "bad"
    cfg = json.loads((mixed.base / "config.json").read_text())
    broken_runs = {
        "nonutf8": _bad_config(bad, mixed, "nonutf8", b'{"model_type": "qwen2\xff\xfe"}'),
        "deep": _bad_config(bad, mixed, "deep", "[" * 100_000 + "]" * 100_000),
        "loop": _bad_config(bad, mixed, "loop", json.dumps(cfg)),
    }
    os.remove(broken_runs["loop"] / "model.safetensors")
    os.symlink("model.safetensors", broken_runs["loop"] / "model.safetensors")  # a link to itself
    broken_bases = {"listed": _bad_config(bad, mixed, "listed", json.dumps([cfg]))}
    # a layer count that is no count is unknown, not an error: depth from the layers seen, and
    # these bases (a copy of mixed's base) scan like it
    odd_layers = {
        "null": _bad_config(bad, mixed, "null", json.dumps(cfg | {"num_hidden_layers": None})),
        "many": _bad_config(bad, mixed, "many", json.dumps(cfg | {"num_hidden_layers": "many"})),
        "huge": _bad_config(
            bad, mixed, "huge", json.dumps(cfg)[:-1] + ', "num_hidden_layers": 1e999}'
        ),
    }
    groups = [
        {
            "name": g,
            "base": str(f.base),
            "runs": [{"name": r, "checkpoint": str(p)} for r, p in f.runs.items()],
        }
        for g, f in fams.items()
    ]
    groups[1]["runs"] += [{"name": r, "checkpoint": str(p)} for r, p in broken_runs.items()]
    groups += [
        {
            "name": f"base-{b}",
            "base": str(p),
            "runs": [{"name": "grpo", "checkpoint": str(mixed.runs["grpo"])}],
        }
        for b, p in {**broken_bases, **odd_layers}.items()
    ]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"groups": groups, "params": {"geometry": False}}))
    out = tmp_path / "results"
    p = _cli("scan", str(sweep), "--out", str(out), "--num-cpus", "1")

    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    # (Ray may log its own warnings on this stream)
    lines = [x for x in p.stderr.splitlines() if x.startswith("rlvr-ray: ")]
    lines = [x for x in lines if "Ray token file" not in x]  # this machine's token, if shared
    expected = [(f"group mixed: run {r} skipped: ", str(d)) for r, d in broken_runs.items()]
    expected += [(f"group base-{b}: base skipped: ", str(d)) for b, d in broken_bases.items()]
    assert len(lines) == len(expected), lines
    for line, (head, ref) in zip(lines, expected, strict=True):
        assert line.startswith(f"rlvr-ray: {head}") and ref in line, (line, head)
    # the good groups and the good runs of the mixed group: every tensor, the planted counts
    got = {}
    from rlvr_ray.io import catalog

    con = catalog.connect(str(out))
    try:
        rows = con.execute("SELECT group_name, run, tensor, n_changed FROM tensors_all").fetchall()
    finally:
        con.close()
    for g, r, t, n in rows:
        got.setdefault(g, {})[(r, t)] = n
    want = {g: expected_changed(f) for g, f in fams.items()}
    for b in odd_layers:  # mixed's base against mixed's grpo run
        want[f"base-{b}"] = {k: n for k, n in want["mixed"].items() if k[0] == "grpo"}
    assert got == want


def test_consistency_compares_runs_of_one_class_by_default(tmp_path):
    """An SFT run stays out of the group's consistency unless it asks in; the quick form's
    --no-consistency takes any run out, and names only runs it has."""
    from rlvr_ray.cli import _sweep_from_args, build_parser

    runs = [
        {"name": "grpo", "checkpoint": "g", "algorithm": "GRPO"},
        {"name": "sft", "checkpoint": "s", "algorithm": "sft"},
        {"name": "sft-in", "checkpoint": "s2", "algorithm": "sft", "consistency": True},
        {"name": "plain", "checkpoint": "p"},
    ]
    sweep = sweep_from_dict({"groups": [{"name": "g", "base": "b", "runs": runs}]}, tmp_path)
    got = {r.name: r.consistency for r in sweep.groups[0].runs}
    assert got == {"grpo": True, "sft": False, "sft-in": True, "plain": True}

    def quick(*extra):
        argv = [
            "scan",
            "--base",
            "b",
            "--run",
            "grpo:grpo=g",
            "--run",
            "ppo:ppo=p",
            "--run",
            "sft:sft=s",
            *extra,
        ]
        return _sweep_from_args(build_parser("scan").parse_args(argv))

    got = {r.name: r.consistency for r in quick().groups[0].runs}
    assert got == {"grpo": True, "ppo": True, "sft": False}
    got = {r.name: r.consistency for r in quick("--no-consistency", "ppo").groups[0].runs}
    assert got == {"grpo": True, "ppo": False, "sft": False}
    with pytest.raises(SweepError, match=r"^--no-consistency nope: no --run of that name$"):
        quick("--no-consistency", "nope")


def test_a_series_earlier_steps_stay_out_of_consistency_by_default(tmp_path):
    """One training run's saved steps are nested masks of one path, not other runs: all but a
    series' last step stay out of the group's consistency unless they ask in; another series,
    a run with no series and an SFT run are as before, and step pairs are still formed."""
    runs = [
        {"name": "a10", "checkpoint": "a10", "algorithm": "grpo", "series": "a", "step": 10},
        {"name": "a30", "checkpoint": "a30", "algorithm": "grpo", "series": "a", "step": 30},
        {"name": "a20", "checkpoint": "a20", "algorithm": "grpo", "series": "a", "step": 20},
        {"name": "b5", "checkpoint": "b5", "algorithm": "dapo", "series": "b", "step": 5},
        {"name": "b9", "checkpoint": "b9", "series": "b", "step": 9, "consistency": True},
        {"name": "b7", "checkpoint": "b7", "series": "b", "step": 7, "consistency": True},
        {"name": "solo", "checkpoint": "s", "algorithm": "ppo", "step": 3},
        {"name": "sft", "checkpoint": "f", "algorithm": "sft", "series": "f", "step": 40},
    ]
    group = {"name": "g", "base": "b", "runs": runs, "step_pairs": True}
    sweep = sweep_from_dict({"groups": [group]}, tmp_path)
    got = {r.name: r.consistency for r in sweep.groups[0].runs}
    assert got == {
        "a10": False,
        "a30": True,
        "a20": False,
        "b5": False,
        "b9": True,
        "b7": True,  # asked in
        "solo": True,
        "sft": False,
    }
    pairs = sorted(g.name for g in sweep.scan_groups() if "/steps/" in g.name)
    assert pairs == ["g/steps/a/10-20", "g/steps/a/20-30", "g/steps/b/5-7", "g/steps/b/7-9"]
