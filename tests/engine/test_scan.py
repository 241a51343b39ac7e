"""End to end on a real local Ray: sweep -> actors -> Parquet -> atlas.duckdb -> CLI."""

import json
import shutil
import subprocess
import sys

import duckdb
import pytest
import yaml

from rlvr_ray.cli import main
from rlvr_ray.engine.config import SweepError, load_sweep, sweep_from_dict
from rlvr_ray.engine.driver import run_scan


def np_changed(fam, run):
    return sum(
        int(((fam.bits["base"][k] != b) & (((fam.bits["base"][k] | b) & 0x7FFF) != 0)).sum())
        for k, b in fam.bits[run].items()
    )


@pytest.fixture(scope="module")
def two_families(qwen_family, llama_family, tmp_path_factory, ray_local):
    sweep = {
        "groups": [
            {
                "name": "qwen",
                "base": str(qwen_family.base),
                "runs": [
                    {"name": n, "checkpoint": str(p), "algorithm": n.split("-")[0], "step": 100}
                    for n, p in qwen_family.runs.items()
                ],
            },
            {
                "name": "llama",
                "base": str(llama_family.base),
                "runs": [
                    {"name": n, "checkpoint": str(p), "algorithm": n}
                    for n, p in llama_family.runs.items()
                ],
            },
        ],
        "params": {"geometry": False},
    }
    out = tmp_path_factory.mktemp("scan") / "results"
    res = run_scan(sweep_from_dict(sweep, out.parent), str(out))
    return sweep, out, res


def test_sparsity_per_run_is_weighted_by_numel(two_families, qwen_family, llama_family):
    sweep, out, res = two_families
    assert res.exit_code == 0 and not res.errors and res.n_units_resumed == 0
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    got = dict(
        ((g, r), (s, n))
        for g, r, s, n in con.execute(
            "SELECT group_name, run, sparsity, n_changed FROM run_sparsity"
        ).fetchall()
    )
    for group, fam in [("qwen", qwen_family), ("llama", llama_family)]:
        total = sum(v.size for v in fam.bits["base"].values())
        for run in fam.runs:
            n = np_changed(fam, run)
            assert got[(group, run)] == (pytest.approx(1 - n / total, rel=1e-12), n)
    fams = {f for (f,) in con.execute("SELECT DISTINCT family FROM cross_family").fetchall()}
    assert fams == {"qwen2", "llama"}
    sim = con.execute("SELECT family_a, family_b, n_cells FROM cross_family_similarity").fetchall()
    assert sim and sim[0][:2] == ("llama", "qwen2") and sim[0][2] > 0
    ck = con.execute("SELECT count(*), count(DISTINCT fingerprint) FROM checkpoints").fetchone()
    assert ck == (8, 8)  # 2 bases + 6 runs


def test_rerun_skips_done_units_and_force_never_duplicates(two_families):
    sweep, out, first = two_families
    again = run_scan(sweep_from_dict(sweep, out.parent), str(out))
    assert again.n_units_resumed == again.n_units == first.n_units
    forced = run_scan(sweep_from_dict(sweep, out.parent), str(out), force=True)
    assert forced.n_units_resumed == 0
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    dup = con.execute(
        "SELECT count(*) - count(DISTINCT (scan_id, run, tensor)) FROM tensors_all"
    ).fetchone()
    assert dup == (0,)
    dup = con.execute(
        "SELECT count(*) - count(DISTINCT (scan_id, run, tensor, axis, idx)) FROM profiles_all"
    ).fetchone()
    assert dup == (0,)


def test_moved_results_directory_still_opens(two_families, tmp_path):
    _, out, _ = two_families
    moved = shutil.copytree(out, tmp_path / "elsewhere")
    code = "import duckdb,sys; c=duckdb.connect(sys.argv[1], read_only=True); print(c.execute('SELECT count(*) FROM summary').fetchone()[0])"
    r = subprocess.run(
        [sys.executable, "-c", code, str(moved / "atlas.duckdb")],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    assert r.stdout.strip() == "6"


def test_added_run_replaces_the_groups_current_view(llama_family, qwen_family, tmp_path, ray_local):
    out = tmp_path / "r"
    g = {
        "name": "g",
        "base": str(llama_family.base),
        "runs": [{"name": "grpo", "checkpoint": str(llama_family.runs["grpo"])}],
    }
    run_scan(sweep_from_dict({"groups": [g], "params": {"geometry": False}}, tmp_path), str(out))
    g["runs"].append({"name": "ppo", "checkpoint": str(llama_family.runs["ppo"])})
    run_scan(sweep_from_dict({"groups": [g], "params": {"geometry": False}}, tmp_path), str(out))
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    assert con.execute("SELECT count(DISTINCT scan_id) FROM tensors_all").fetchone() == (2,)
    per_run = con.execute("SELECT run, count(*) FROM tensors GROUP BY run ORDER BY run").fetchall()
    n = len(llama_family.bits["base"])
    assert per_run == [("grpo", n), ("ppo", n)]
    assert con.execute("SELECT DISTINCT n_runs FROM consistency").fetchall() == [(2,)]


def test_bad_run_is_skipped_others_scanned_and_exit_status_says_so(
    llama_family, tmp_path, ray_local, capsys
):
    broken = shutil.copytree(llama_family.runs["ppo"], tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code = main(
        [
            "scan",
            "--base",
            str(llama_family.base),
            "--run",
            f"grpo:grpo={llama_family.runs['grpo']}",
            "--run",
            f"bad:ppo={broken}",
            "--out",
            str(out),
            "--no-geometry",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "run bad skipped" in err and "model.safetensors" in err and "truncated" in err
    code = main(
        ["sql", "SELECT run, algorithm FROM run_sparsity", "--out", str(out), "--format", "json"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [{"run": "grpo", "algorithm": "grpo"}]


def test_malformed_sweeps_name_the_field(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "base": "b", "runs": [{"name": "r"}]}]})
    )
    with pytest.raises(SweepError, match=r"groups\.0\.runs\.0\.checkpoint: Field required"):
        load_sweep(bad)
    bad.write_text("groups: [ {name: g, base: b, runs: [")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(bad)
    bad.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "base": "b",
                        "runs": [
                            {"name": "r", "checkpoint": "x"},
                            {"name": "r", "checkpoint": "y"},
                        ],
                    }
                ]
            }
        )
    )
    with pytest.raises(SweepError, match="duplicate run names"):
        load_sweep(bad)
    bad.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "base": "b",
                        "runs": [{"name": "r", "checkpoint": "x", "step": -1}],
                    }
                ]
            }
        )
    )
    with pytest.raises(SweepError, match=r"runs\.0\.step"):
        load_sweep(bad)


def test_sweep_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "s.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "base": "../b",
                        "runs": [{"name": "r", "checkpoint": "r1", "algorithm": "GRPO"}],
                    }
                ]
            }
        )
    )
    s = load_sweep(f)
    assert s.groups[0].base == str(tmp_path / "b")
    assert s.groups[0].runs[0].checkpoint == str(tmp_path / "sub" / "r1")
    assert s.groups[0].runs[0].algorithm == "grpo"


def test_summary_and_sql_formats(two_families, capsys):
    _, out, _ = two_families
    assert main(["summary", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sparsity" in text and "grpo-a" in text and "mean_jaccard" in text
    assert (
        main(
            [
                "sql",
                "SELECT run FROM summary WHERE group_name = 'llama' ORDER BY run",
                "--out",
                str(out),
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == ["run", "grpo", "ppo"]
    assert main(["sql", "SELECT nope FROM summary", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_flags_override_sweep_params_only_when_given(tmp_path):
    from rlvr_ray.cli import _sweep_from_args, build_parser

    f = tmp_path / "s.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "groups": [{"name": "g", "base": "b", "runs": [{"name": "r", "checkpoint": "c"}]}],
                "params": {"rank_k": 8, "alpha": 0.25},
            }
        )
    )
    s = _sweep_from_args(build_parser().parse_args(["scan", str(f)]))
    assert (s.params.rank_k, s.params.alpha, s.params.geometry) == (8, 0.25, True)
    s = _sweep_from_args(
        build_parser().parse_args(["scan", str(f), "--rank-k", "16", "--no-geometry"])
    )
    assert (s.params.rank_k, s.params.alpha, s.params.geometry) == (16, 0.25, False)
    assert s.groups[0].base == str(tmp_path / "b")
    bad = build_parser().parse_args(["scan", str(f), "--alpha", "2"])
    with pytest.raises(SweepError, match="params.alpha"):
        _sweep_from_args(bad)
