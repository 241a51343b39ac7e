"""k-step sparsity: a group's ``step_pairs`` compares consecutive saved steps of a series.

A planted series (base, then steps 10, 20 and 40 of one run, each step a few ULP moves away
from the step before) is scanned on a real local Ray; the step_* views are checked against a
numpy count of the bf16 patterns that changed between consecutive steps, and the headline
views against the same results before the step pairs were added.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from rlvr_ray.engine.config import SweepError, is_step_pair, step_pair_groups, sweep_from_dict
from rlvr_ray.engine.driver import run_scan
from rlvr_ray.lab.planted import plant_update, random_base, tensor_shapes, write_checkpoint

STEPS = (10, 20, 40)
HEADLINE = (
    "run_sparsity",
    "summary",
    "summary_final",
    "algorithm_summary",
    "final_runs",
    "cross_family",
    "group_summary",
    "density_by_role_depth",
    "consistency_by_role",
    "run_geometry",
    "checkpoints",
    "tensors",
    "consistency",
)


def _key(bits: np.ndarray) -> np.ndarray:
    """bf16 patterns -> integers in the order of their values (+0 and -0 alike)."""
    b = bits.astype(np.int64)
    return np.where(b >= 0x8000, -(b & 0x7FFF), b)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Base, steps 10/20/40 of series ``grpo`` (each from the step before), and one other run."""
    root = tmp_path_factory.mktemp("series")
    rng = np.random.default_rng(7)
    base = {k: random_base(s, rng) for k, s in tensor_shapes("qwen2", 1).items()}
    bits = {"base": base}
    write_checkpoint(root / "base", base, "qwen2", 1)
    prev = base
    for step, density in zip(STEPS, (0.3, 0.05, 0.2)):
        prev = {k: plant_update(v, density, rng) for k, v in prev.items()}
        bits[step] = prev
        write_checkpoint(root / f"step-{step}", prev, "qwen2", 1)
    bits["other"] = {k: plant_update(v, 0.25, rng) for k, v in base.items()}
    write_checkpoint(root / "other", bits["other"], "qwen2", 1)
    return root, bits


def _sweep(root, step_pairs) -> dict:
    runs = [
        {
            "name": "grpo" if s == STEPS[-1] else f"grpo@{s}",
            "checkpoint": f"step-{s}",
            "algorithm": "grpo",
            "step": s,
            "series": "grpo",
        }
        for s in STEPS
    ]
    runs.append({"name": "other", "checkpoint": "other", "algorithm": "dapo", "step": 40})
    group = {"name": "lab", "base": "base", "runs": runs, "step_pairs": step_pairs}
    return {"groups": [group], "params": {"rank_frac": 0.25}}


def _views(out) -> dict[str, list[str]]:
    """The headline views' rows, scan ids and creation times aside, floats to 12 digits (an
    aggregate's last bits depend on the order DuckDB adds in)."""
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    got = {}
    for view in HEADLINE:
        cur = con.execute(f"SELECT * FROM {view}")
        keep = [i for i, d in enumerate(cur.description) if d[0] not in ("scan_id", "created_at")]
        got[view] = sorted(
            repr(tuple(float(f"{r[i]:.12g}") if isinstance(r[i], float) else r[i] for i in keep))
            for r in cur.fetchall()
        )
    con.close()
    return got


@pytest.fixture(scope="module")
def scans(series, tmp_path_factory, ray_local):
    """The sweep scanned without step pairs (its headline views kept), then with them into
    the same results: the main group's units are done and resume, the pairs are scanned."""
    root, _ = series
    out = tmp_path_factory.mktemp("steps") / "results"
    first = run_scan(sweep_from_dict(_sweep(root, False), root), str(out))
    assert first.exit_code == 0 and not first.errors, first.errors
    before = _views(out)
    res = run_scan(sweep_from_dict(_sweep(root, True), root), str(out))
    assert res.exit_code == 0 and not res.errors, res.errors
    assert res.n_units_resumed == first.n_units and res.scan_ids[0] == first.scan_ids[0]
    return out, res, before


def test_step_pair_groups_are_named_from_the_series_steps(series):
    root, _ = series
    sweep = sweep_from_dict(_sweep(root, True), root)
    names = [g.name for g in sweep.scan_groups()]
    assert names == ["lab", "lab/steps/grpo/10-20", "lab/steps/grpo/20-40"]
    pair = sweep.scan_groups()[2]
    assert pair.base == str(root / "step-20")
    assert [(r.name, r.step, r.checkpoint, r.consistency) for r in pair.runs] == [
        ("grpo", 40, str(root / "step-40"), False)
    ]
    assert is_step_pair(pair.name) and not is_step_pair("lab")
    # only the series named; False: none
    assert step_pair_groups(sweep.groups[0].model_copy(update={"step_pairs": False})) == ()
    named = sweep_from_dict(_sweep(root, ["grpo"]), root)
    assert [g.name for g in named.scan_groups()] == names


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda g: g["runs"][1].pop("step"), "series 'grpo' run 'grpo@20' has no step"),
        (lambda g: g["runs"][1].update(step=10), "duplicate steps in series 'grpo': ['10']"),
        (
            lambda g: g.update(step_pairs=["dapo"]),
            "step_pairs: series ['dapo'] need at least two runs",
        ),
        (lambda g: [r.update(series="a/b") for r in g["runs"][:3]], "must match"),
    ],
)
def test_bad_step_pairs_are_one_line_errors_naming_the_field(series, edit, message):
    root, _ = series
    data = _sweep(root, True)
    edit(data["groups"][0])
    with pytest.raises(SweepError) as e:
        sweep_from_dict(data, root, "s.yaml")
    msg = str(e.value)
    assert msg.startswith("sweep s.yaml: groups.0: ") and message in msg and "\n" not in msg


def test_k_step_sparsity_equals_numpy_per_tensor_and_model(scans, series):
    _, bits = series
    out, res, _ = scans
    assert len(res.scan_ids) == 3
    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    rows = con.execute("""SELECT step_from, step_to, k, series, group_name, run, tensor, numel,
                                 n_changed, sparsity, ulp1_share, status
                          FROM step_sparsity_by_tensor""").fetchall()
    pairs = [(10, 20), (20, 40)]
    assert {r[:6] for r in rows} == {
        (10, 20, 10, "grpo", "lab", "grpo@20"),
        (20, 40, 20, "grpo", "lab", "grpo"),
    }
    assert len(rows) == 2 * len(bits["base"])
    model = {}
    for t0, t1, _, _, _, _, tensor, numel, n_changed, sparsity, ulp1, status in rows:
        a, b = bits[t0][tensor], bits[t1][tensor]
        moved = np.abs(_key(b) - _key(a))
        n = int((moved > 0).sum())
        assert status == "ok" and numel == a.size and n_changed == n
        assert sparsity == pytest.approx(1 - n / a.size, rel=1e-12)
        if n:
            assert ulp1 == pytest.approx((moved == 1).sum() / n, rel=1e-12)
        else:  # no change: no share of changes
            assert ulp1 is None
        tot = model.setdefault((t0, t1), [0, 0, 0])
        tot[0] += a.size
        tot[1] += n
        tot[2] += int((moved == 1).sum())
    got = con.execute("""SELECT step_from, step_to, numel, n_changed, sparsity, ulp1_share,
                                n_tensors, n_tensors_all FROM step_sparsity""").fetchall()
    assert [g[:2] for g in got] == pairs
    for t0, t1, numel, n_changed, sparsity, ulp1, n_ok, n_all in got:
        numel_np, n_np, one_np = model[(t0, t1)]
        assert (numel, n_changed, n_ok, n_all) == (numel_np, n_np, len(bits["base"]), n_ok)
        assert sparsity == pytest.approx(1 - n_np / numel_np, rel=1e-12)
        assert ulp1 == pytest.approx(one_np / n_np, rel=1e-12)
    # step pairs are scanned without geometry (the main group's is kept)
    geo = dict(
        con.execute("""SELECT contains(group_name, '/'), count(*) FILTER (WHERE
                              geometry_status = 'ok') FROM tensors_all GROUP BY 1""").fetchall()
    )
    assert geo[True] == 0 and geo[False] > 0


def test_headline_views_are_unchanged_by_step_pairs(scans):
    """Every headline view holds the same rows with and without the step pairs."""
    out, _, before = scans
    after = _views(out)
    assert before["run_sparsity"] and before["group_summary"] and before["summary"]
    for view in HEADLINE:
        assert after[view] == before[view], view


def test_demo_headline_shows_the_k_step_sparsity(scans):
    from rlvr_ray.demo import HEADLINE as DEMO
    from rlvr_ray.io import catalog

    out, _, _ = scans
    cols, rows = catalog.query(str(out), DEMO[-1][1])
    assert cols[:5] == ["group_name", "algorithm", "step_from", "step_to", "series"]
    assert [r[:5] for r in rows] == [("lab", "grpo", 10, 20, 1), ("lab", "grpo", 20, 40, 1)]
