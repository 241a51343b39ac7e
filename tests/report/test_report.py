"""The HTML report over real scans: numbers vs numpy/SQL, images decode, notes when data is missing.

Two scans made once for the module by the real engine on the session's local Ray: two families
(qwen2 with a three-step series, llama) and a one-run scan with no steps and no geometry.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pagelib import decode_png, parse
from PIL import Image as PILImage

from rlvr_ray.cli import main
from rlvr_ray.engine.config import sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import SPECTRA, ULP_BIN_EDGES
from rlvr_ray.lab.planted import planted_family
from rlvr_ray.report.data import NO_GEOMETRY
from rlvr_ray.report.html import render, write_report

QWEN_RUNS = {"grpo-s50": 0.1, "grpo-s100": 0.15, "grpo-s150": 0.2, "dapo": 0.25, "sft": 0.9}
LLAMA_RUNS = {"grpo": 0.15, "ppo": 0.2, "sft": 0.95}


def _run(name, path, **labels):
    return {"name": name, "checkpoint": str(path), **labels}


@pytest.fixture(scope="module")
def scans(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("report")
    q = planted_family(root / "qwen2", "qwen2", layers=3, runs=QWEN_RUNS, seed=11)
    ll = planted_family(root / "llama", "llama", layers=4, runs=LLAMA_RUNS, seed=12)
    one = planted_family(root / "one", "llama", layers=2, runs={"grpo": 0.2}, seed=13)
    steps = [
        _run(f"grpo-s{s}", q.runs[f"grpo-s{s}"], algorithm="grpo", step=s, series="grpo-s1")
        for s in (50, 100, 150)
    ]
    multi = {
        "groups": [
            {
                "name": "qwen2-lab",
                "base": str(q.base),
                "runs": steps
                + [
                    _run("dapo", q.runs["dapo"], algorithm="dapo"),
                    _run("sft", q.runs["sft"], algorithm="sft", consistency=False),
                ],
            },
            {
                "name": "llama-lab",
                "base": str(ll.base),
                "runs": [_run(n, p, algorithm=n) for n, p in ll.runs.items()],
            },
        ]
    }
    single = {
        "groups": [
            {"name": "solo", "base": str(one.base), "runs": [_run("grpo", one.runs["grpo"])]}
        ],
        "params": {"geometry": False},
    }
    out_multi, out_one = root / "multi", root / "one-run"
    for sweep, out in ((multi, out_multi), (single, out_one)):
        res = run_scan(sweep_from_dict(sweep, root), str(out), num_cpus=2)
        assert res.exit_code == 0 and not res.errors, res
    return {
        "multi": out_multi,
        "one": out_one,
        "families": {"qwen2-lab": q, "llama-lab": ll, "solo": one},
    }


@pytest.fixture(scope="module")
def multi_report(scans):
    paths = write_report(scans["multi"], fmt="png")
    html = (scans["multi"] / "report.html").read_text()
    return paths, html, parse(html)


def masks(fam, run):
    """tensor -> bool changed mask from the planted bit patterns (+0 == -0)."""
    b0 = fam.bits["base"]
    return {k: (b0[k] != b) & (((b0[k] | b) & 0x7FFF) != 0) for k, b in fam.bits[run].items()}


def has_geometry(out) -> bool:
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    try:
        return con.execute("SELECT count(nss) FROM tensors").fetchone()[0] > 0
    finally:
        con.close()


def test_sparsity_table_matches_numpy(scans, multi_report):
    page = multi_report[2]
    got = {(r["Group"], r["Run"]): r for r in page.records("sparsity-table")}
    expected = {(g, r) for g, f in scans["families"].items() if g != "solo" for r in f.runs}
    assert set(got) == expected
    for (g, run), rec in got.items():
        m = masks(scans["families"][g], run)
        changed, total = sum(int(v.sum()) for v in m.values()), sum(v.size for v in m.values())
        assert rec["Sparsity"] == f"{100 * (1 - changed / total):.2f}%"
        assert rec["Update density"] == f"{changed / total:.4f}"
        assert rec["Weights compared"] == f"{total:,}"
    assert (
        got[("qwen2-lab", "grpo-s100")]["Step"] == "100"
        and got[("qwen2-lab", "dapo")]["Step"] == ""
    )
    assert [r[2] for r in page.tables["paper-sparsity"][1:3]] == ["SFT", "GRPO"]


def test_the_header_names_the_results_directory(scans, multi_report):
    assert multi_report[2].meta["Results"] == str(scans["multi"])


def test_an_overlap_level_with_its_baseline_at_the_digits_shown_reads_level():
    from rlvr_ray.report.geometry import _overlap_reading

    lines = {
        ("g", "SFT"): [{"overlap_princ": 0.49996, "princ_density": 0.5}],
        ("g", "RL"): [{"overlap_princ": 0.40, "princ_density": 0.5}],
    }
    assert _overlap_reading(lines) == (
        "Overlap with the principal weights, mean over layers: "
        "g SFT: 0.500 vs baseline 0.500 (level); g RL: 0.400 vs baseline 0.500 (below)."
    )


def test_consistency_table_matches_numpy_and_sql(scans, multi_report):
    page = multi_report[2]
    got = {(r["Group"], r["Role"]): r for r in page.records("consistency-table")}
    # numpy: q projections of qwen2-lab, over the two runs in its consistency: the grpo
    # series by its last step (its steps 50 and 100 are one run's path) and dapo (sft is not)
    q = scans["families"]["qwen2-lab"]
    runs = [masks(q, r) for r in ("grpo-s150", "dapo")]
    names = [k for k in q.bits["base"] if k.endswith("q_proj.weight")]
    jac, base = [], []
    for k in names:
        pairs = list(itertools.combinations([m[k] for m in runs], 2))
        jac.append(np.mean([(a & b).sum() / (a | b).sum() for a, b in pairs]))
        ps = [(a.mean(), b.mean()) for a, b in pairs]
        base.append(np.mean([p * r / (p + r - p * r) for p, r in ps]))
    rec = got[("qwen2-lab", "q")]
    assert (rec["Jaccard"], rec["Baseline"], rec["Tensors"]) == (
        f"{np.mean(jac):.3f}",
        f"{np.mean(base):.3f}",
        "3",
    )
    # SQL over the raw table for every (group, role)
    con = duckdb.connect(str(scans["multi"] / "atlas.duckdb"), read_only=True)
    sql = con.execute("""SELECT group_name, role, avg(mean_jaccard), avg(jaccard_baseline), count(*)
                         FROM consistency_all WHERE mean_jaccard IS NOT NULL GROUP BY ALL""").fetchall()
    con.close()
    assert len(sql) == len(got)
    for g, role, j, b, n in sql:
        rec = got[(g, role)]
        assert (rec["Jaccard"], rec["Baseline"], rec["Tensors"]) == (f"{j:.3f}", f"{b:.3f}", str(n))
        assert float(rec["Jaccard"]) > float(rec["Baseline"]) or role in ("norm", "bias")


def test_every_image_decodes_and_pngs_match(scans, multi_report):
    paths, _, page = multi_report
    geo = has_geometry(scans["multi"])
    # sparsity, maps x2 groups, one series, consistency, cross-family (+ overlaps, spectral)
    want = {
        "sparsity": 1,
        "precision": 1,
        "maps": 2,
        "steps": 2,
        "consistency": 1,
        "cross-family": 1,
    }
    if geo:
        want |= {"overlaps": 1, "spectral": 3}
    assert page.images_by_section == want
    for data in page.images:
        w, h = decode_png(data)
        assert w > 200 and h > 100
    pngs = [p for p in paths[1:]]
    assert len(pngs) == len(page.images)
    assert all(p.startswith(str(scans["multi"] / "report") + "/") for p in pngs)
    assert sorted(Path(p).read_bytes() for p in pngs) == sorted(page.images)
    assert page.meta["Detail layer"] == "qwen2-lab: 1, llama-lab: 1"  # middle of 3 and 4 layers
    caps = page.captions["steps"]
    assert len(caps) == 2 and caps[1].startswith("qwen2-lab / series grpo-s1, layer 1")


def test_missing_geometry_is_explained(scans, tmp_path):
    assert not has_geometry(scans["one"])  # scanned with geometry: false
    page = parse(Path(write_report(scans["one"], report=tmp_path / "r.html")[0]).read_text())
    for sec in ("overlaps", "spectral"):
        assert page.notes[sec][0].startswith(NO_GEOMETRY) and sec not in page.images_by_section


def test_one_run_no_steps_no_geometry(scans):
    out = scans["one"]
    page = parse(Path(write_report(out)[0]).read_text())
    fam = scans["families"]["solo"]
    m = masks(fam, "grpo")
    changed, total = sum(int(v.sum()) for v in m.values()), sum(v.size for v in m.values())
    [rec] = page.records("sparsity-table")
    assert (rec["Run"], rec["Sparsity"]) == ("grpo", f"{100 * (1 - changed / total):.2f}%")
    assert page.notes["steps"] == [
        "no training series with several steps in this scan (label runs with series and step "
        "to follow a run over training)"
    ]
    assert page.notes["consistency"][0].startswith("no cross-run consistency")
    assert page.notes["overlaps"][0].startswith(NO_GEOMETRY)
    assert page.notes["spectral"][0].startswith(NO_GEOMETRY)
    assert page.notes["cross-family"] == [
        "only one family (llama) in this scan: nothing to compare it with"
    ]
    # maps: one run and no consensus (a single run has no cross-run statistics)
    assert page.images_by_section == {"sparsity": 1, "precision": 1, "maps": 1, "cross-family": 1}
    assert page.meta["Geometry"] == "not computed"


def test_layer_and_group_options(scans, tmp_path):
    path = tmp_path / "r.html"
    write_report(scans["multi"], layer=2, group="qwen2-lab", report=path)
    page = parse(path.read_text())
    assert page.meta["Detail layer"] == "qwen2-lab: 2"
    assert {r["Group"] for r in page.records("sparsity-table")} == {"qwen2-lab"}
    assert page.captions["maps"][0].startswith("qwen2-lab, layer 2:")
    assert not (tmp_path / "r").exists()  # html only: no PNG folder


def test_cli_report_and_bad_input(scans, tmp_path, capsys):
    dest = tmp_path / "sub" / "x.html"
    assert (
        main(["report", "--out", str(scans["multi"]), "--report", str(dest), "--format", "png"])
        == 0
    )
    assert dest.exists() and len(list((tmp_path / "sub" / "x").glob("*.png"))) >= 6
    assert f"wrote {dest}" in capsys.readouterr().out
    bad = [
        (
            ["--group", "nope"],
            "--group 'nope': no such group in these results (have: llama-lab, qwen2-lab)",
        ),
        (["--layer", "9"], "--layer 9: no group has that layer (layers start at 0)"),
    ]
    for args, msg in bad:
        assert main(["report", "--out", str(scans["multi"]), *args]) == 2
        assert capsys.readouterr().err.strip() == f"rlvr-ray: error: {msg}"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--out", str(empty)]) == 2
    assert "no results here" in capsys.readouterr().err


MATRIX_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _plant_geometry(out, flag: dict[str, str] | None = None) -> list[tuple[str, float]]:
    """Fill the geometry columns of every tensors part (as a geometry scan would) and add a
    spectra part; -> (RL|SFT, nss) of every matrix row, for the expected medians. flag: role ->
    geometry_status for roles whose geometry is no finding (the rest are 'ok')."""
    planted = []
    for part in (out / "tables" / "spectra").glob("*.parquet"):  # the engine's own: replaced
        part.unlink()
    for part in sorted((out / "tables" / "tensors").glob("*.parquet")):
        t = pq.read_table(part)
        d = t.to_pydict()
        for k in (
            "nss",
            "max_angle_left",
            "max_angle_right",
            "overlap_princ",
            "princ_density",
            "overlap_low",
            "low_density",
            "overlap_princ_not_low",
            "princ_not_low_density",
        ):
            d[k] = [None] * t.num_rows
        for i, (role, layer, algo) in enumerate(
            zip(d["role"], d["layer"], d["algorithm"], strict=True)
        ):
            if role not in MATRIX_ROLES:
                continue
            sft = algo == "sft"
            nss = 0.1 + 0.01 * layer if sft else 1e-5 * (1 + layer) * (1 + MATRIX_ROLES.index(role))
            planted.append(("SFT" if sft else "RL", nss))
            d["nss"][i], d["max_angle_left"][i], d["max_angle_right"][i] = nss, 3 * nss, 2 * nss
            d["overlap_princ"][i], d["princ_density"][i] = (0.6, 0.5) if sft else (0.4, 0.5)
            d["overlap_low"][i], d["low_density"][i] = 0.55, 0.5
            d["overlap_princ_not_low"][i], d["princ_not_low_density"][i] = 0.2, 0.25
            d["geometry_status"][i] = (flag or {}).get(role, "ok")
        pq.write_table(pa.Table.from_pydict(d, schema=t.schema), part)
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    scan_id, tensor = con.execute("""SELECT scan_id, tensor FROM tensors WHERE group_name =
        'qwen2-lab' AND layer = 1 AND role = 'q' LIMIT 1""").fetchone()
    con.close()
    spec = [
        {
            "scan_id": scan_id,
            "group_name": "qwen2-lab",
            "run": run,
            "tensor": tensor,
            "i": i,
            "sigma_base": 8.0 - i,
            "sigma_run": (8.0 - i) * (1 + 1e-4),
            "angle_left": 1e-5 * (i + 1),
            "angle_right": 2e-5 * (i + 1),
        }
        for run in QWEN_RUNS
        for i in range(8)
    ]
    ResultsDir(str(out)).write_table(
        "spectra", "geometry-test", pa.Table.from_pylist(spec, schema=SPECTRA)
    )
    catalog.refresh(str(out))
    return planted


def test_geometry_figures_when_present(scans, tmp_path):
    out = tmp_path / "geo"
    shutil.copytree(scans["multi"], out)
    planted = _plant_geometry(out)
    page = parse(Path(write_report(out)[0]).read_text())
    assert "overlaps" not in page.notes and "spectral" not in page.notes
    # overlaps: one figure; spectral: per-layer figure + the q spectrum of qwen2-lab's layer 1
    assert page.images_by_section["overlaps"] == 1 and page.images_by_section["spectral"] == 2
    # planted: sigma_run = sigma_base * (1 + 1e-4) for every run; NSS medians as below
    assert page.captions["spectral"][1] == (
        "qwen2-lab, layer 1, q projection: blue = RL runs, red = SFT runs; zero shifts and "
        "angles are left out of the log axes. Median relative singular value shift: RL 0.0001, "
        "SFT 0.0001."
    )
    got = {r["Runs"]: r for r in page.records("spectral-table")}
    for cls in ("RL", "SFT"):
        vals = np.array([v for c, v in planted if c == cls])
        assert got[cls]["Matrices"] == str(len(vals))
        assert got[cls]["Median NSS"] == f"{np.median(vals):.3g}"
        assert got[cls]["Max NSS"] == f"{vals.max():.3g}"
        assert got[cls]["Median max angle (rad)"] == f"{np.median(3 * vals):.3g}"
    rl, sft = (np.median([v for c, v in planted if c == cls]) for cls in ("RL", "SFT"))
    assert page.captions["spectral"][0] == (
        f"Median NSS over decomposed matrices: RL {rl:.3g}, SFT {sft:.3g} (SFT {sft / rl:.3g}x RL)."
    )
    for data in page.images:
        decode_png(data)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]


def test_report_renders_in_headless_chromium(scans, multi_report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    page = multi_report[2]
    url = (scans["multi"] / "report.html").as_uri()
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    # set by the page's own script on load, from what the browser actually decoded
    n = len(page.images)
    assert re.search(rf'data-images="{n}"', dom.stdout) and re.search(
        rf'data-images-decoded="{n}"', dom.stdout
    )
    for sec in ("sparsity", "maps", "steps", "consistency", "overlaps", "spectral", "cross-family"):
        assert f'<section id="{sec}">' in dom.stdout
    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'p2'}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and decode_png(shot.read_bytes()) == (1200, 2400)
    with PILImage.open(shot) as im:
        assert np.asarray(im.convert("L")).std() > 10  # a rendered page, not a blank one


def test_flagged_geometry_is_warned_about_and_left_out(scans, tmp_path):
    out = tmp_path / "flagged"
    shutil.copytree(scans["multi"], out)
    _plant_geometry(out, {"k": "k_not_below_rank", "v": "small_gap"})
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    n = dict(
        con.execute(
            "SELECT role, count(DISTINCT group_name || tensor) FROM tensors "
            "WHERE role IN ('q', 'k', 'v', 'o', 'gate', 'up', 'down') GROUP BY role"
        ).fetchall()
    )
    con.close()
    total = sum(n.values())
    warning = (
        f"Warning: the geometry of {n['k'] + n['v']} of {total} decomposed matrices is no "
        f"finding ({n['k']} k_not_below_rank (k > short side / 4), {n['v']} small_gap "
        "(singular-value gap at k < 0.001)); their overlaps and principal angles are left "
        "out below, their NSS (which needs no k) is kept."
    )
    page = parse(Path(write_report(out)[0]).read_text())
    assert page.notes["overlaps"] == [warning] and page.notes["spectral"] == [warning]
    # the warning comes before the figures it is about
    html = (out / "report.html").read_text()
    assert html.index("Warning: the geometry") < html.index('alt="overlaps"')
    assert page.images_by_section["overlaps"] == 1


# -- what the figures draw, against numpy on the planted bits ---------------------------------
@pytest.fixture(scope="module")
def multi_sections(scans):
    return {s.key: s for s in render(scans["multi"])[1]}


#: final checkpoints by algorithm: the series grpo-s1 ends at step 150, other runs have no step
FINAL = {
    "grpo": [("qwen2-lab", "grpo-s150"), ("llama-lab", "grpo")],
    "dapo": [("qwen2-lab", "dapo")],
    "ppo": [("llama-lab", "ppo")],
    "sft": [("qwen2-lab", "sft"), ("llama-lab", "sft")],
}


def sparsity_of(scans, g, run) -> float:
    m = masks(scans["families"][g], run)
    return 1 - sum(int(v.sum()) for v in m.values()) / sum(v.size for v in m.values())


def ulp_hist_of(scans, g, run) -> np.ndarray:
    """Changed weights per ULP_BIN_EDGES bin, from the planted bit patterns: the ULP distance is
    the difference of the patterns on the ordered line of bf16 values (sign-magnitude)."""
    fam = scans["families"][g]

    def ordered(b):
        b = b.astype(np.int64)
        return np.where(b & 0x8000, -(b & 0x7FFF), b & 0x7FFF)

    hist = np.zeros(len(ULP_BIN_EDGES), dtype=np.int64)
    for k, changed in masks(fam, run).items():
        steps = np.abs(ordered(fam.bits[run][k]) - ordered(fam.bits["base"][k]))[changed]
        hist += np.bincount(
            np.searchsorted(ULP_BIN_EDGES, steps, side="right") - 1, minlength=len(ULP_BIN_EDGES)
        )
    return hist


def test_precision_gate_matches_numpy(scans, multi_report, multi_sections):
    page = multi_report[2]
    # per run: the table's shares are the planted ULP distances' histogram
    got = {(r["Group"], r["Run"]): r for r in page.records("precision-table")}
    labels = ["1", "2", "3", "4", "5-8", "9-16", "17-64", ">=65"]
    assert page.tables["precision-table"][0] == ["Group", "Run", "Algorithm", "Changed", *labels]
    for g, fam in scans["families"].items():
        for run in fam.runs if g != "solo" else []:
            h = ulp_hist_of(scans, g, run)
            assert got[(g, run)]["Changed"] == f"{h.sum():,}"
            assert [got[(g, run)][lb] for lb in labels] == [f"{100 * c / h.sum():.1f}%" for c in h]
    # per algorithm (final checkpoints): the figure's counts are a numpy sum of the ulp_hist rows
    con = duckdb.connect(str(scans["multi"] / "atlas.duckdb"), read_only=True)
    hist_rows = con.execute("SELECT group_name, run, ulp_hist FROM tensors").fetchall()
    con.close()
    [img] = multi_sections["precision"].images
    assert set(img.meta["hist"]) == set(FINAL)
    for algo, runs in FINAL.items():
        summed = np.sum([h for g, r, h in hist_rows if (g, r) in runs], axis=0)
        assert img.meta["hist"][algo] == summed.tolist()
        assert (
            summed.tolist() == np.sum([ulp_hist_of(scans, g, r) for g, r in runs], axis=0).tolist()
        )
        share = summed / summed.sum()
        assert (
            f"{algo}: {100 * share[0]:.0f}% moved one ULP, {100 * share[:4].sum():.0f}% at most 4"
        ) in img.caption


def test_sparsity_by_step_is_run_sparsity(scans, multi_sections):
    img = multi_sections["steps"].images[0]
    want = [(s, sparsity_of(scans, "qwen2-lab", f"grpo-s{s}")) for s in (50, 100, 150)]
    [(name, pts)] = img.meta["points"].items()
    assert name == "qwen2-lab / grpo-s1"
    assert [s for s, _ in pts] == [50, 100, 150]
    np.testing.assert_allclose([v for _, v in pts], [v for _, v in want], rtol=1e-12)
    con = duckdb.connect(str(scans["multi"] / "atlas.duckdb"), read_only=True)
    view = con.execute(
        "SELECT step, sparsity FROM run_sparsity WHERE series = 'grpo-s1' ORDER BY step"
    ).fetchall()
    con.close()
    assert [tuple(p) for p in pts] == view
    (s0, v0), (s1, v1) = want[0], want[-1]
    assert (
        f"qwen2-lab / grpo-s1: {100 * v0:.1f}% unchanged at step {s0}, {100 * v1:.1f}% at step {s1}"
    ) in img.caption


def test_algorithm_table_is_over_final_checkpoints(scans, multi_report, multi_sections):
    page = multi_report[2]
    recs = page.records("algorithm-table")
    assert [r["Algorithm"] for r in recs] == ["dapo", "grpo", "ppo", "sft"]
    cap = multi_sections["sparsity"].images[0].caption
    for r in recs:
        vals = [sparsity_of(scans, g, run) for g, run in FINAL[r["Algorithm"]]]
        lo, hi = 100 * min(vals), 100 * max(vals)
        assert r["Runs"] == str(len(vals))  # grpo: 2 (the series counts once, at step 150)
        assert r["Mean sparsity"] == f"{100 * np.mean(vals):.1f}%"
        assert r["Range"] == f"{lo:.1f}% - {hi:.1f}%"
        span = f"{lo:.1f}%" if len(vals) == 1 else f"{lo:.1f}-{hi:.1f}%"
        assert f"{r['Algorithm']} {span} ({len(vals)})" in cap


def test_maps_share_one_colour_scale_at_true_aspect(scans, multi_sections):
    con = duckdb.connect(str(scans["multi"] / "atlas.duckdb"), read_only=True)
    for img in multi_sections["maps"].images:
        g = img.name.removeprefix("maps-")
        # every panel drawn (five runs at most: all shown, plus the consensus) of layer 1's
        # q, k, v, o and down
        names = [
            k
            for k in scans["families"][g].bits["base"]
            if ".layers.1." in k
            and k.endswith(
                (
                    "q_proj.weight",
                    "k_proj.weight",
                    "v_proj.weight",
                    "o_proj.weight",
                    "down_proj.weight",
                )
            )
        ]
        values = con.execute(
            "SELECT values FROM maps WHERE group_name = ? AND list_contains(?, tensor)", [g, names]
        ).fetchall()
        vmax = max(max(v) for (v,) in values)
        assert img.meta["vmax"] == pytest.approx(vmax, rel=1e-6)
        assert f"0 to {vmax:.3g} (the largest pooled share)" in img.caption
        assert sorted(k.removesuffix("#") for k in img.meta["sizes"]) == sorted(names)
        for k, (h, w) in img.meta["sizes"].items():
            rows_, cols_ = scans["families"][g].bits["base"][k.removesuffix("#")].shape
            assert max(h, w) == 96 and w / h == pytest.approx(cols_ / rows_, rel=0.05)
    con.close()
    # the planted qwen2 k projection is 16 x 32: drawn twice as wide as tall
    qwen = next(i for i in multi_sections["maps"].images if i.name == "maps-qwen2-lab")
    assert qwen.meta["sizes"]["model.layers.1.self_attn.k_proj.weight#"] == (48, 96)


def test_jaccard_panels_share_one_y_range(scans, multi_sections):
    con = duckdb.connect(str(scans["multi"] / "atlas.duckdb"), read_only=True)
    top = con.execute(
        "SELECT max(greatest(mean_jaccard, jaccard_baseline)) FROM consistency_by_role"
    ).fetchone()[0]
    con.close()
    [img] = multi_sections["consistency"].images
    assert img.meta["ylim"] == pytest.approx(1.15 * top)
    assert img.caption.startswith(f"One y range for every panel (0 to {1.15 * top:.3g}).")
