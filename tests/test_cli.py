"""The ``rlvr-ray`` command as a user runs it: real subprocesses, a real scan, a real atlas."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from rlvr_ray.cli import main
from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "ray", "numba", "transformers"}

# Put first on PYTHONPATH, this makes the modules named in $RLVR_TEST_BLOCK unimportable: a real
# import failure, as when an extra is not installed.
BLOCKER = """\
import os, sys

BLOCKED = set(os.environ.get("RLVR_TEST_BLOCK", "").split(","))


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""


def n_changed(fam, run):
    """Weights whose bf16 bits changed, +0/-0 not counted (numpy, independent of the scan)."""
    base = fam.bits["base"]
    return sum(
        int(((base[k] != b) & (((base[k] | b) & 0x7FFF) != 0)).sum())
        for k, b in fam.bits[run].items()
    )


def cli(*args, block=(), cwd=None, tmp=None, **kw):
    env = dict(os.environ)
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    if block:
        (tmp / "sitecustomize.py").write_text(BLOCKER)
        paths.insert(0, str(tmp))
        env["RLVR_TEST_BLOCK"] = ",".join(block)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, **kw
    )


@pytest.fixture(scope="module")
def results(llama_family, tmp_path_factory, ray_local):
    runs = [{"name": n, "checkpoint": str(p), "algorithm": n} for n, p in llama_family.runs.items()]
    sweep = {
        "groups": [{"name": "llama", "base": str(llama_family.base), "runs": runs}],
        "params": {"geometry": False},
    }
    out = tmp_path_factory.mktemp("cli") / "results"
    res = run_scan(sweep_from_dict(sweep, out.parent), str(out))
    assert res.exit_code == 0
    return out


@pytest.mark.parametrize(
    "argv, block, line",
    [
        (
            ["lab", "--preset", "tiny"],
            ["transformers"],
            "rlvr-ray lab: error: needs transformers, from the `lab` extra: pip install 'rlvr-ray[lab]'",
        ),
        (
            ["report"],
            ["matplotlib"],
            "rlvr-ray report: error: needs matplotlib, from the `report` extra: "
            "pip install 'rlvr-ray[report]'",
        ),
        (
            ["demo", "--preset", "tiny"],
            ["transformers"],
            "rlvr-ray demo: error: needs transformers, from the `lab` extra: "
            "pip install 'rlvr-ray[lab]' (or run the demo with --planted)",
        ),
    ],
)
def test_a_command_whose_extra_is_missing_names_it_in_one_line(tmp_path, argv, block, line):
    r = cli("-m", "rlvr_ray.cli", *argv, "--out", str(tmp_path / "out"), block=block, tmp=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")
    assert not (tmp_path / "out").exists()
    listing = cli("-m", "rlvr_ray.cli", "--help", block=block, tmp=tmp_path).stdout
    extra = line.split("`")[1]
    if argv[0] != "demo":  # the demo needs the lab only without --planted
        # argparse wraps the help text, at spaces and hyphens
        assert f"(needspipinstall'rlvr-ray[{extra}]')" in "".join(listing.split())


def imported(r) -> set[str]:
    """Top-level packages named in ``python -X importtime``'s report."""
    names = [
        line.split("|")[-1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:")
    ]
    return {n.split(".")[0] for n in names[1:]}  # the first line is the header


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["sql", "--help"],
        ["sql", "SELECT 42 AS x"],
        ["summary"],
        ["summary", "--format", "json"],
        ["report", "--report", "REPORT"],
    ],
)
def test_query_commands_import_no_torch_ray_or_numba(results, tmp_path, argv):
    argv = [str(tmp_path / "r.html") if a == "REPORT" else a for a in argv]
    out = [] if "--help" in argv else ["--out", str(results)]
    r = cli("-X", "importtime", "-m", "rlvr_ray.cli", *argv, *out)
    assert r.returncode == 0, r.stderr[-2000:]
    mods = imported(r)
    assert "duckdb" in mods or "--help" in argv
    assert mods & HEAVY == set()


def test_a_scan_imports_no_pandas_nor_scipy_linalg_where_they_are_installed(llama_family, tmp_path):
    """pyarrow would import pandas (~0.2 s) at its first conversion of a Python list, and
    numba SciPy's BLAS bindings (scipy.linalg, 0.15-0.2 s) at its first kernel load."""
    pytest.importorskip("pandas")
    pytest.importorskip("scipy")
    runs = [a for n, p in llama_family.runs.items() for a in ("--run", f"{n}={p}")]
    argv = ["scan", "--base", str(llama_family.base), *runs, "--no-geometry"]
    r = cli("-X", "importtime", "-m", "rlvr_ray.cli", *argv, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    mods = imported(r)
    assert "pyarrow" in mods and "numba" in mods
    # each library's one look finds none (the module is named, its submodules never load)
    names = [line.split("|")[-1].strip() for line in r.stderr.splitlines()]
    assert not [n for n in names if n.startswith(("pandas.", "scipy.linalg._", "numpy.f2py"))]
    assert "scipy.linalg" in names and "pandas" in names  # (they were looked for)
    # and the rows are whole: the atlas holds every tensor of both runs
    con = duckdb.connect(str(tmp_path / "out" / "atlas.duckdb"), read_only=True)
    n = con.execute("SELECT count(*) FROM tensors WHERE status = 'ok'").fetchone()[0]
    assert n == 2 * len(llama_family.bits["base"])


def test_summary_json_is_one_object_keyed_by_table(results, llama_family, capsys):
    assert main(["summary", "--out", str(results), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["runs", "runs_geometry", "algorithms", "groups"]
    total = sum(v.size for v in llama_family.bits["base"].values())
    got = {r["run"]: r["sparsity"] for r in doc["runs"]}
    assert got == {
        run: pytest.approx(1 - n_changed(llama_family, run) / total, rel=1e-15, abs=0)
        for run in ("grpo", "ppo")
    }  # full precision: only the text table rounds
    assert doc["runs_geometry"] == []  # scanned without geometry
    assert [(a["algorithm"], a["n_runs"]) for a in doc["algorithms"]] == [("grpo", 1), ("ppo", 1)]
    assert [(g["group_name"], g["n_runs"]) for g in doc["groups"]] == [("llama", 2)]


def test_summary_csv_is_one_table_chosen_by_name(results, capsys):
    assert main(["summary", "--out", str(results), "--format", "csv"]) == 2
    assert capsys.readouterr().err == (
        "rlvr-ray: error: --format csv writes one table: add "
        "--table NAME (runs, runs_geometry, algorithms, groups)\n"
    )
    assert main(["summary", "--out", str(results), "--format", "csv", "--table", "runs"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == [
        "group_name",
        "run",
        "algorithm",
        "step",
        "sparsity",
        "ulp1_share",
        "coverage",
        "tensor_coverage",
    ]
    assert sorted(r[1] for r in rows[1:]) == ["grpo", "ppo"]
    assert {(r[6], r[7]) for r in rows[1:]} == {("1.0", "1.0")}  # every tensor compared


def test_sql_json_has_no_nan_and_numbers_stay_numbers(results, capsys):
    q = "SELECT 'nan'::DOUBLE AS x, 1.5::DECIMAL(4, 2) AS d, DATE '2026-01-02' AS day"
    assert main(["sql", q, "--out", str(results), "--format", "json"]) == 0

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    got = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert got == [{"x": None, "d": 1.5, "day": "2026-01-02"}]


def test_sql_error_keeps_duckdbs_hints(results, capsys):
    q = "SELECT run FROM run_sparsty"
    con = duckdb.connect(str(results / "atlas.duckdb"), read_only=True)
    with pytest.raises(duckdb.Error) as direct:
        con.execute(q)
    con.close()
    assert main(["sql", q, "--out", str(results)]) == 2
    err = capsys.readouterr().err
    assert err == f"rlvr-ray: error: {str(direct.value).strip()}\n"
    assert 'Did you mean "run_sparsity"' in err


def test_a_closed_pipe_ends_quietly(results):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlvr_ray.cli",
            "sql",
            "SELECT * FROM range(300000)",
            "--out",
            str(results),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert p.stdout.readline() == b"range\n"
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    assert (p.wait(timeout=60), err) == (141, "")


def test_every_commands_help_describes_it(capsys):
    for cmd, words in [
        ("sql", "SHOW TABLES lists them"),
        ("summary", "keyed by table name"),
        (
            "demo",
            "usage: rlvr-ray demo [-h] [--out OUT] [--planted] [--preset PRESET] "
            "[--num-cpus NUM_CPUS] build the lab's checkpoint families (cached), scan them",
        ),
        ("watch", "[--no-geometry] scan newly published RL fine-tunes of Hub bases"),
        (
            "scan",
            "--address ADDRESS Ray cluster to join (default: $RAY_ADDRESS, else none: see "
            "--executor)",
        ),
    ]:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert words in " ".join(capsys.readouterr().out.split())


def test_demo_rejects_an_unknown_preset_in_one_line(tmp_path, capsys):
    assert main(["demo", "--preset", "tny", "--out", str(tmp_path / "d")]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err
        == "rlvr-ray demo: error: unknown preset 'tny' (presets: default, paper, tiny)\n"
    )
    assert not (tmp_path / "d").exists()


def test_demo_hints_name_a_command_that_runs(monkeypatch, tmp_path):
    from rlvr_ray.demo import cli_command

    script = Path(sys.executable).parent / "rlvr-ray"
    if not script.exists():
        pytest.skip("no rlvr-ray script next to this Python")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert cli_command() == str(script)
    monkeypatch.chdir(script.parent.parent)
    assert cli_command() == os.path.join(script.parent.name, "rlvr-ray")
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}/usr/bin:/bin")
    assert cli_command() == "rlvr-ray"


def test_listing_of_optional_commands_matches_their_parsers():
    import argparse
    import importlib

    from rlvr_ray.cli import OPTIONAL_COMMANDS

    for name, (module, _, help_text) in OPTIONAL_COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_parser(sub)
        assert [(a.dest, a.help) for a in sub._choices_actions] == [(name, help_text)]


def test_the_end_of_a_scan_summarizes_its_own_groups(
    llama_family, qwen_family, tmp_path, ray_local, capsys
):
    out = str(tmp_path / "out")
    for group, fam in (("first", qwen_family), ("second", llama_family)):
        run = next(iter(fam.runs))
        argv = ["scan", "--base", str(fam.base), "--run", f"{run}={fam.runs[run]}"]
        argv += ["--group", group, "--out", out, "--no-geometry"]
        capsys.readouterr()
        assert main(argv) == 0
    said = capsys.readouterr().out
    # the second scan's summary: its group, not the atlas's two
    runs = said[said.index("Per run:") :].splitlines()[3:]
    assert [line.split()[:2] for line in runs if line.strip()] == [["second", "grpo"]]
    assert "Per algorithm" not in said
    assert main(["summary", "--out", out, "--format", "csv", "--table", "runs"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["first", "grpo-a"], ["second", "grpo"]]


def test_demo_planted_runs_from_a_fresh_directory_with_the_default_out(tmp_path, monkeypatch):
    """`rlvr-ray demo --planted` in an empty directory (its relative default --out): every
    run's changed count is numpy's on the same planted families, written elsewhere."""
    import duckdb

    from rlvr_ray.lab.planted import planted_family

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--planted"]) == 0
    con = duckdb.connect("demo-out/results/atlas.duckdb", read_only=True)
    got = dict(
        con.execute("SELECT group_name || '/' || run, n_changed FROM run_sparsity").fetchall()
    )
    want = {}
    runs = {"grpo-s1": 0.3, "grpo-s2": 0.3, "dapo": 0.35, "sft": 0.97}
    for i, mt in enumerate(["qwen2", "llama", "mistral"]):
        fam = planted_family(tmp_path / "ref" / mt, mt, layers=4, runs=runs, seed=i)
        want |= {f"{mt}-planted/{run}": n_changed(fam, run) for run in runs}
    assert got == want and min(want.values()) > 0
