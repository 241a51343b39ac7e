"""The scan command's geometry flags and its one-line warning when geometry is no finding."""

import duckdb
import pytest

from rlvr_ray.cli import build_parser, main

WARNING = (
    "rlvr-ray: warning: geometry of {n} of {n} decomposed matrices is no finding: "
    "{n} k_not_below_rank (k > short side / 4); summary and views leave their overlaps and "
    "angles out (SELECT tensor, rows, cols, rank_k, sigma_gap, geometry_status FROM tensors "
    "WHERE geometry_status <> 'ok')"
)


def _decomposed(fam) -> int:
    """Matrices that get geometry by default: 2-D, not embed / lm_head (hand count)."""
    names = [k for k, v in fam.bits["base"].items() if v.ndim == 2]
    return len([k for k in names if "embed_tokens" not in k and not k.startswith("lm_head")])


def _scan(fam, out, *flags) -> int:
    run = f"grpo-a:grpo={fam.runs['grpo-a']}"
    return main(["scan", "--base", str(fam.base), "--run", run, "--out", str(out), *flags])


def test_full_rank_k_warns_once_and_views_leave_it_out(qwen_family, ray_local, tmp_path, capsys):
    n = _decomposed(qwen_family)
    assert n == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert _scan(qwen_family, tmp_path / "abs", "--rank-k", "64", "--progress", "quiet") == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning: geometry" in line] == [WARNING.format(n=n)]
    con = duckdb.connect(str(tmp_path / "abs" / "atlas.duckdb"), read_only=True)
    row = con.execute(
        "SELECT overlap_princ, overlap_low, median_max_angle, n_tensors, n_flagged, "
        "median_nss IS NOT NULL FROM run_geometry"
    ).fetchone()
    assert row == (None, None, None, 0, n, True)  # NSS needs no k; overlaps and angles do
    assert con.execute("SELECT count(*) FROM overlap_by_role_depth").fetchone() == (0,)
    summary = con.execute("SELECT overlap_princ, geometry_flagged FROM summary").fetchone()
    assert summary == (None, n)


@pytest.mark.slow  # a second scan on Ray; the rule itself: test_geometry_stage.py
def test_relative_k_scans_without_warning(qwen_family, ray_local, tmp_path, capsys):
    assert _scan(qwen_family, tmp_path / "rel", "--rank-frac", "0.05", "--progress", "quiet") == 0
    assert "warning: geometry" not in capsys.readouterr().err
    con = duckdb.connect(str(tmp_path / "rel" / "atlas.duckdb"), read_only=True)
    row = con.execute("SELECT n_tensors, n_flagged, overlap_princ IS NOT NULL FROM run_geometry")
    assert row.fetchone() == (_decomposed(qwen_family), 0, True)
    ks = con.execute("SELECT DISTINCT least(rows, cols), rank_k FROM tensors WHERE nss > 0")
    assert sorted(ks.fetchall()) == [(16, 1), (32, 2)]  # floor(0.05 * p + 0.5)


def test_a_fraction_on_the_command_line_replaces_the_sweeps_k(tmp_path):
    from rlvr_ray.cli import _sweep_from_args

    f = tmp_path / "s.yaml"
    f.write_text(
        "groups: [{name: g, base: b, runs: [{name: r, checkpoint: c}]}]\n"
        "params: {rank_k: 64, spectral_k: 32}\n"
    )
    args = build_parser().parse_args(["scan", str(f), "--rank-frac", "0.1"])
    p = _sweep_from_args(args).params
    assert (p.rank_k, p.rank_frac, p.spectral_k) == (None, 0.1, 32)
    assert p.ks((256, 1024)) == (26, 32)


def test_full_spectrum_flag_sets_the_parameter(tmp_path):
    from rlvr_ray.cli import _sweep_from_args

    f = tmp_path / "s.yaml"
    f.write_text("groups: [{name: g, base: b, runs: [{name: r, checkpoint: c}]}]\n")
    default = build_parser().parse_args(["scan", str(f)])
    assert _sweep_from_args(default).params.full_spectrum is False
    args = build_parser().parse_args(["scan", str(f), "--full-spectrum"])
    assert _sweep_from_args(args).params.full_spectrum is True


def test_max_svd_numel_flag_names_what_it_skipped(qwen_family, ray_local, tmp_path, capsys):
    base = qwen_family.bits["base"]
    mats = {k: v.size for k, v in base.items() if v.ndim == 2}
    mats = {
        k: n for k, n in mats.items() if "embed_tokens" not in k and not k.startswith("lm_head")
    }
    limit = sorted(mats.values())[len(mats) // 2]  # the median: about half are over it
    over = sorted((-n, k) for k, n in mats.items() if n > limit)
    assert 0 < len(over) < len(mats)
    out = tmp_path / "size"
    assert _scan(qwen_family, out, "--max-svd-numel", str(limit), "--progress", "quiet") == 0
    name, numel = over[0][1], -over[0][0]
    rows, cols = base[name].shape
    expected = (
        f"rlvr-ray: warning: no geometry for {len(over)} matrices of more than --max-svd-numel "
        f"{limit} elements (skipped_size), the largest {name} ({rows} x {cols} = {numel}); rerun "
        f"with --max-svd-numel {numel} to include them (SELECT tensor, rows, cols FROM tensors "
        "WHERE geometry_status = 'skipped_size')"
    )
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "--max-svd-numel" in line] == [expected]
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    got = con.execute("SELECT tensor FROM tensors WHERE geometry_status = 'skipped_size'")
    assert sorted(r[0] for r in got.fetchall()) == sorted(k for _, k in over)
