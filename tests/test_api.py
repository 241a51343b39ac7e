"""The Python API: a real scan through ``rlvr_ray.scan``, read back with ``view``/``open_atlas``."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import rlvr_ray
from rlvr_ray.cli import _sweep_from_args, build_parser
from rlvr_ray.engine.config import SweepError

ROOT = Path(__file__).resolve().parents[1]


def n_changed(fam, run):
    """Weights whose bf16 bits changed, +0/-0 not counted (numpy, independent of the scan)."""
    base = fam.bits["base"]
    return sum(
        int(((base[k] != b) & (((base[k] | b) & 0x7FFF) != 0)).sum())
        for k, b in fam.bits[run].items()
    )


@pytest.fixture(scope="module")
def scanned(llama_family, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("api") / "results"
    runs = {"grpo:GRPO": llama_family.runs["grpo"], "ppo": llama_family.runs["ppo"]}
    res = rlvr_ray.scan(
        base=llama_family.base, runs=runs, group="llama", out=out, params={"geometry": False}
    )
    return res, out


def test_scan_through_the_api_writes_the_runs(scanned, llama_family):
    res, out = scanned
    assert (res.exit_code, res.errors) == (0, [])
    table = rlvr_ray.view(out, "run_sparsity")
    rows = {r["run"]: r for r in table.to_pylist()}
    total = sum(v.size for v in llama_family.bits["base"].values())
    assert sorted(rows) == ["grpo", "ppo"]
    for run in rows:
        n = n_changed(llama_family, run)
        assert (rows[run]["group_name"], rows[run]["numel"], rows[run]["n_changed"]) == (
            "llama",
            total,
            n,
        )
        assert rows[run]["sparsity"] == pytest.approx(1 - n / total, rel=1e-12)
    assert (rows["grpo"]["algorithm"], rows["ppo"]["algorithm"]) == ("grpo", None)
    n_units = res.n_units
    assert repr(res) == (
        f"ScanResult(out={res.out!r}, exit_code=0, units={n_units} (0 already done), "
        f"tensors={len(llama_family.bits['base'])}, errors=0, skipped=0, warnings=0, "
        f"executor={res.executor!r}, seconds={res.seconds:.1f})"
    )
    con = rlvr_ray.open_atlas(out)
    try:
        assert con.execute("SELECT count(*) FROM tensors").fetchone()[0] == 2 * len(
            llama_family.bits["base"]
        )
    finally:
        con.close()


def test_view_errors_are_one_line(scanned):
    _, out = scanned
    with pytest.raises(
        ValueError,
        match=r"^.*: no table or view 'run_sparsty' in the atlas \(did you mean 'run_sparsity'\? "
        r"SHOW TABLES lists them\)$",
    ):
        rlvr_ray.view(out, "run_sparsty")
    with pytest.raises(ValueError, match=r"no table or view 'zzz' in the atlas \(SHOW TABLES"):
        rlvr_ray.view(out, "zzz")
    with pytest.raises(ValueError, match=r"^as_='excel': expected one of arrow, pandas, polars$"):
        rlvr_ray.view(out, "summary", as_="excel")
    for lib in ("pandas", "polars"):
        if importlib.util.find_spec(lib) is None:
            with pytest.raises(ImportError) as e:
                rlvr_ray.view(out, "summary", as_=lib)
            assert str(e.value) == f"view(as_={lib!r}) needs {lib}: pip install 'rlvr-ray[{lib}]'"
        else:
            assert len(rlvr_ray.view(out, "summary", as_=lib)) == 2
    with pytest.raises(FileNotFoundError, match="no results here"):
        rlvr_ray.open_atlas(out.parent / "nothing")


def test_sweep_forms_agree_and_fail_as_the_command_does(tmp_path):
    data = {
        "groups": [
            {
                "name": "g",
                "base": str(tmp_path / "b"),
                "runs": [{"name": "r", "checkpoint": str(tmp_path / "c"), "algorithm": "grpo"}],
            }
        ],
        "params": {"rank_k": 8},
    }
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(data))
    from_file = rlvr_ray.make_sweep(f)
    assert rlvr_ray.make_sweep(data) == from_file
    quick = rlvr_ray.make_sweep(
        base=tmp_path / "b", runs={"r:GRPO": tmp_path / "c"}, group="g", params={"rank_k": 8}
    )
    assert quick.groups == from_file.groups and quick.params == from_file.params
    assert rlvr_ray.make_sweep(f, params={"alpha": 0.25}).params.alpha == 0.25
    with pytest.raises(SweepError, match=r"^give a sweep or base= with runs=, not both$"):
        rlvr_ray.make_sweep(f, base="b", runs={"r": "c"})
    with pytest.raises(SweepError, match=r"^scan needs a sweep, or base= with at least one run"):
        rlvr_ray.make_sweep(base="b")
    # a bad parameter: the same validation error as `rlvr-ray scan --alpha 2`
    args = build_parser().parse_args(["scan", "--base", "b", "--run", "r=c", "--alpha", "2"])
    with pytest.raises(SweepError) as cli_error:
        _sweep_from_args(args)
    with pytest.raises(SweepError) as api_error:
        rlvr_ray.make_sweep(base="b", runs={"r": "c"}, params={"alpha": 2})
    detail = [str(e.value).split(": ", 1)[1] for e in (cli_error, api_error)]
    assert detail == ["params.alpha: Input should be less than 1"] * 2


def test_import_rlvr_ray_stays_light(scanned):
    _, out = scanned
    code = (
        "import sys, rlvr_ray; t = rlvr_ray.view(sys.argv[1], 'summary'); "
        "print(t.num_rows, sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'ray', 'numba', 'transformers'}))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout) == (0, "2 []\n"), r.stderr


def test_masters_in_every_sweep_form(tmp_path):
    """A run's fp32 master: the sweep's ``master:`` (relative to the file), ``--master
    NAME=PATH`` and ``masters=`` give the same run; a master of no run is refused."""
    data = {
        "groups": [
            {
                "name": "g",
                "base": "b",
                "runs": [
                    {"name": "r", "checkpoint": "c", "algorithm": "grpo", "master": "c-fp32"},
                    {"name": "s", "checkpoint": "d"},
                ],
            }
        ]
    }
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(data))
    from_file = rlvr_ray.make_sweep(f).groups[0]
    assert [r.master for r in from_file.runs] == [str(tmp_path / "c-fp32"), None]
    runs = {"r:grpo": tmp_path / "c", "s": tmp_path / "d"}
    quick = rlvr_ray.make_sweep(
        base=tmp_path / "b", runs=runs, group="g", masters={"r": tmp_path / "c-fp32"}
    )
    assert quick.groups[0] == from_file
    argv = ["scan", "--base", str(tmp_path / "b"), "--run", f"r:grpo={tmp_path / 'c'}"]
    argv += ["--run", f"s={tmp_path / 'd'}", "--master", f"r={tmp_path / 'c-fp32'}", "--group", "g"]
    assert _sweep_from_args(build_parser().parse_args(argv)).groups[0] == from_file
    with pytest.raises(SweepError, match=r"^--master x: no --run of that name$"):
        _sweep_from_args(build_parser().parse_args([*argv, "--master", "x=y"]))
    with pytest.raises(SweepError, match=r"^--master 'r': expected NAME=PATH$"):
        _sweep_from_args(build_parser().parse_args([*argv, "--master", "r"]))
    with pytest.raises(SweepError, match=r"^masters: 'x' is not a run of runs=$"):
        rlvr_ray.make_sweep(base="b", runs=runs, masters={"x": "y"})
