"""ScanWorker without Ray: exact per-tensor answers from numpy, and a status for every defect."""

from itertools import combinations

import duckdb
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlvr_ray.engine.config import Group, Params, Run
from rlvr_ray.engine.plan import RunSpec, plan_group
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.io.checkpoint import open_checkpoint
from rlvr_ray.io.schema import PACKED, ULP_BIN_EDGES
from rlvr_ray.lab.planted import bf16_bits_to_f64, write_checkpoint
from rlvr_ray.sql.views import unpacked


@pytest.fixture(params=["whole", "streamed"], autouse=True)
def read_mode(request, monkeypatch):
    """Every test here runs twice: tensors read whole, and streamed row range by row range
    (in windows of 97 elements, so a tiny tensor takes several, each read ahead; the fused
    CPU pass, which streams every tensor it does not decompose, in windows of 97 too)."""
    from rlvr_ray.engine import memory, passes, source

    if request.param == "streamed":
        monkeypatch.setattr(memory, "STREAM_MIN_BYTES", 0)
        monkeypatch.setattr(source, "STREAM_WINDOW_NUMEL", 97)
        monkeypatch.setattr(passes, "FUSED_WINDOW_NUMEL", 97)
        monkeypatch.setattr(passes, "FUSED_ARENA_NUMEL", 97)
    return request.param


def scan(tmp_path, base, runs: dict, params=None, consistency=None):
    """Plan one group and run every unit in-process; -> DuckDB connection over the parts."""
    cks = []
    for name, path in runs.items():
        ck = open_checkpoint(str(path))
        flag = True if consistency is None else name in consistency
        cks.append((RunSpec(name, str(path), ck.fingerprint, consistency=flag), ck))
    group = Group(
        name="g", base=str(base), runs=[Run(name=n, checkpoint=str(p)) for n, p in runs.items()]
    )
    plan = plan_group(
        group, open_checkpoint(str(base)), cks, params or Params(geometry=False), 1 << 28
    )
    out = tmp_path / "out"
    worker = ScanWorker(str(out))
    reports = [worker.run_unit(u) for u in plan.units]
    con = duckdb.connect()
    for t in ["tensors", "profiles", "consistency", "maps", "consensus_profiles"]:
        rows = f"SELECT * FROM read_parquet('{out}/tables/{t}/*.parquet')"
        con.execute(f"CREATE VIEW {t} AS {unpacked(rows, PACKED[t]) if t in PACKED else rows}")
    return con, reports, plan


def np_gini(x):
    """Mean-absolute-difference form: sum_ij |xi - xj| / (2 n^2 mean)."""
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def np_mask(b0, b1):
    return (b0 != b1) & (((b0 | b1) & 0x7FFF) != 0)


def test_every_tensor_matches_numpy(qwen_family, tmp_path):
    fam = qwen_family
    con, reports, plan = scan(tmp_path, fam.base, fam.runs)
    assert len(plan.units) >= 16 and sum(r["n_tensors"] for r in reports) == len(fam.bits["base"])
    assert all(r["seconds"] >= 0 and r["cpu_seconds"] > 0 for r in reports)  # a report's times
    rows = con.execute(
        "SELECT run, tensor, n_changed, numel, update_density, ulp1_share, ulp_hist,"
        " rel_frob, max_abs_update, status, stripe_row, stripe_col FROM tensors"
    ).fetchall()
    assert len(rows) == 4 * len(fam.bits["base"])
    for run, tensor, n_changed, numel, dens, ulp1, hist, rel, mx, status, s_row, s_col in rows:
        b0, b1 = fam.bits["base"][tensor], fam.bits[run][tensor]
        m = np_mask(b0, b1)
        assert status == "ok" and numel == b0.size and n_changed == int(m.sum())
        assert dens == pytest.approx(m.mean(), rel=1e-12)
        key = lambda b: np.where(b >= 0x8000, -(b.astype(np.int64) & 0x7FFF), b.astype(np.int64))  # noqa: E731
        s = np.abs(key(b1) - key(b0))[m]
        assert ulp1 == pytest.approx((s == 1).mean(), rel=1e-12)
        edges = list(ULP_BIN_EDGES) + [1 << 30]
        assert hist == [int(((s >= a) & (s < b)).sum()) for a, b in zip(edges, edges[1:])]
        d = bf16_bits_to_f64(b1) - bf16_bits_to_f64(b0)
        w0 = bf16_bits_to_f64(b0)
        assert rel == pytest.approx(np.sqrt((d**2).sum() / (w0**2).sum()), rel=1e-9)
        assert mx == np.abs(d).max()
        if b0.ndim == 2:  # stripe scores: Gini of the row / column update ratios
            assert s_row == pytest.approx(np_gini(m.mean(axis=1)), rel=1e-9)
            assert s_col == pytest.approx(np_gini(m.mean(axis=0)), rel=1e-9)
        else:
            assert s_row is None and s_col is None
    roles = dict(con.execute("SELECT DISTINCT tensor, role FROM tensors").fetchall())
    assert roles["model.layers.1.self_attn.q_proj.weight"] == "q"
    assert roles["model.layers.1.self_attn.q_proj.bias"] == "bias"
    assert roles["model.layers.0.mlp.down_proj.weight"] == "down"
    assert roles["model.embed_tokens.weight"] == "embed" and roles["lm_head.weight"] == "lm_head"
    assert roles["model.norm.weight"] == "norm"


def test_profiles_and_consistency_match_numpy(qwen_family, tmp_path):
    fam = qwen_family
    con, _, _ = scan(tmp_path, fam.base, fam.runs, consistency={"grpo-a", "grpo-b", "dapo"})
    name = "model.layers.1.mlp.gate_proj.weight"
    m = {
        r: np_mask(fam.bits["base"][name], fam.bits[r][name]) for r in ["grpo-a", "grpo-b", "dapo"]
    }
    ratios = con.execute(
        "SELECT ratio FROM profiles WHERE run = 'grpo-b' AND tensor = ? "
        "AND axis = 'col' ORDER BY idx",
        [name],
    ).fetchall()
    np.testing.assert_allclose([r[0] for r in ratios], m["grpo-b"].mean(axis=0), rtol=1e-6)
    n_runs, runs, counts, mj, base = con.execute(
        "SELECT n_runs, runs, consensus_counts, mean_jaccard, jaccard_baseline FROM consistency "
        "WHERE tensor = ?",
        [name],
    ).fetchone()
    assert n_runs == 3 and sorted(runs) == sorted(m)
    total = sum(m.values())
    assert counts == [int((total == c).sum()) for c in range(4)]
    pairs = list(combinations(m.values(), 2))
    assert mj == pytest.approx(
        np.mean([(a & b).sum() / (a | b).sum() for a, b in pairs]), rel=1e-12
    )
    p = {k: v.mean() for k, v in m.items()}
    ref = np.mean([a * b / (a + b - a * b) for a, b in combinations(p.values(), 2)])
    assert base == pytest.approx(ref, rel=1e-12)
    assert mj > base  # the planted stripes are shared across runs
    kinds = con.execute(
        "SELECT kind, count(*) FROM maps WHERE tensor = ? GROUP BY kind ORDER BY kind", [name]
    ).fetchall()
    assert kinds == [("consensus", 1), ("mask", 4)]


@pytest.fixture
def defects(tmp_path, llama_family):
    """Runs with one defect each, derived from the llama family's bits."""
    bits = {k: v.copy() for k, v in llama_family.bits["grpo"].items()}
    base = llama_family.base
    root = tmp_path / "defects"
    q = "model.layers.0.self_attn.q_proj.weight"
    out = {}
    b = dict(bits)
    b.pop(q)
    out["missing"] = write_checkpoint(root / "missing", b, "llama", 3)
    b = dict(bits)
    b[q] = bits[q][:, :16].copy()
    out["shape"] = write_checkpoint(root / "shape", b, "llama", 3)
    b = dict(bits)
    b["model.embed_tokens.weight"] = np.concatenate([bits["model.embed_tokens.weight"]] * 2)
    out["vocab"] = write_checkpoint(root / "vocab", b, "llama", 3)
    b = dict(bits)
    b[q] = bits[q].copy()
    b[q][3, 3] = 0x7FC0  # NaN
    out["nan"] = write_checkpoint(root / "nan", b, "llama", 3)
    out["same"] = write_checkpoint(root / "same", llama_family.bits["base"], "llama", 3)
    # an fp32 copy of the grpo run: compared after rounding to bf16, identical answers
    d = root / "fp32"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 3}')
    f32 = {k: torch.from_numpy(bf16_bits_to_f64(v).astype(np.float32)) for k, v in bits.items()}
    f32["extra.counter"] = torch.arange(3)
    save_file(f32, str(d / "model.safetensors"))
    out["fp32"] = d
    out["grpo"] = llama_family.runs["grpo"]
    return base, out


def test_statuses_for_defective_runs(defects, tmp_path):
    base, runs = defects
    con, reports, _ = scan(tmp_path, base, runs)
    q = "model.layers.0.self_attn.q_proj.weight"
    st = dict(con.execute("SELECT run, status FROM tensors WHERE tensor = ?", [q]).fetchall())
    assert st == {
        "missing": "missing_in_run",
        "shape": "shape_mismatch",
        "vocab": "ok",
        "nan": "nonfinite",
        "same": "ok",
        "fp32": "ok",
        "grpo": "ok",
    }
    msg = con.execute(
        "SELECT message FROM tensors WHERE run = 'nan' AND tensor = ?", [q]
    ).fetchone()[0]
    assert "1 NaN/Inf" in msg and q in msg and "nan" in msg
    emb = con.execute(
        "SELECT run, status, rows, n_changed, message FROM tensors "
        "WHERE tensor = 'model.embed_tokens.weight' ORDER BY run"
    ).fetchall()
    vocab = [r for r in emb if r[0] == "vocab"][0]
    grpo = [r for r in emb if r[0] == "grpo"][0]
    assert vocab[1] == "vocab_resized" and vocab[2] == grpo[2] and vocab[3] == grpo[3]
    assert "common 80 rows" in vocab[4]
    same = con.execute("SELECT sum(n_changed) FROM tensors WHERE run = 'same'").fetchone()[0]
    assert same == 0
    a = con.execute(
        "SELECT tensor, n_changed, rounded_to_bf16 FROM tensors WHERE run = 'fp32' "
        "AND status = 'ok' ORDER BY tensor"
    ).fetchall()
    b = con.execute(
        "SELECT tensor, n_changed FROM tensors WHERE run = 'grpo' ORDER BY tensor"
    ).fetchall()
    assert [(t, n) for t, n, _ in a] == b and all(r for _, _, r in a)
    extra = con.execute(
        "SELECT status, message FROM tensors WHERE tensor = 'extra.counter'"
    ).fetchone()
    assert extra[0] == "missing_in_base"
    skipped = [s for r in reports for s in r["skipped"]]
    assert any(s.startswith("shape/") and "shape_mismatch" in s for s in skipped)


def test_fused_kernels_and_torch_path_write_identical_tables(qwen_family, tmp_path, monkeypatch):
    """The numba kernels (CPU default) and the torch ops (the GPU's path) agree column by column."""
    from .tablecmp import assert_same_tables, scan_tables

    monkeypatch.setenv("RLVR_RAY_KERNELS", "torch")
    torch_path = scan_tables(qwen_family, tmp_path / "torch", "cpu")
    monkeypatch.setenv("RLVR_RAY_KERNELS", "numba")
    fused = scan_tables(qwen_family, tmp_path / "numba", "cpu")
    worst = assert_same_tables(torch_path, fused)
    assert worst["nss"] == 0.0  # geometry does not depend on the mask path at all


def test_rows_too_wide_for_the_fused_pass_take_the_torch_path(qwen_family, tmp_path, monkeypatch):
    """A tensor whose rows pass MAX_COLS (2^29 - 1 in earnest; made small here) is scanned by
    the torch path, the rest by the fused pass, in one scan: the same tables as all fused."""
    from rlvr_ray.engine import passes

    from .tablecmp import assert_same_tables, scan_tables

    fused = scan_tables(qwen_family, tmp_path / "fused", "cpu")
    calls = {"chunk_pass": 0, "group_pass": 0}
    for name in calls:
        orig = getattr(passes, name)

        def counted(*a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(passes, name, counted)
    monkeypatch.setattr(passes, "MAX_COLS", 32)  # down_proj (32 x 64) goes the torch way
    mixed = scan_tables(qwen_family, tmp_path / "mixed", "cpu")
    assert calls["chunk_pass"] > 0 and calls["group_pass"] > 0
    assert_same_tables(fused, mixed)


def test_a_file_cut_under_the_scan_gives_read_error_rows(qwen_family, tmp_path):
    """A run's shard truncated after planning (the file changed under the scan): the tensors
    past the cut get read_error rows naming the file, every other row is as before, and the
    consistency of those tensors is over the runs that could be read."""
    import shutil

    fam = qwen_family
    cut_run = tmp_path / "cut"
    shutil.copytree(fam.runs["dapo"], cut_run)
    runs = {**fam.runs, "dapo": cut_run}
    cks = [
        (RunSpec(n, str(p), open_checkpoint(str(p)).fingerprint), open_checkpoint(str(p)))
        for n, p in runs.items()
    ]
    group = Group(
        name="g", base=str(fam.base), runs=[Run(name=n, checkpoint=str(p)) for n, p in runs.items()]
    )
    plan = plan_group(group, open_checkpoint(str(fam.base)), cks, Params(geometry=False), 1 << 28)
    out = tmp_path / "out"
    worker = ScanWorker(str(out))
    for ref in [str(fam.base), *map(str, runs.values())]:
        worker.checkpoint(ref)  # the worker has its headers: the scan is under way
    shard = sorted(cut_run.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:  # now cut the last shard in half
        f.truncate(shard.stat().st_size // 2)
    for u in plan.units:
        worker.run_unit(u)
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT run, tensor, status, message FROM read_parquet('{out}/tables/tensors/*.parquet')"
    ).fetchall()
    assert len(rows) == len(runs) * len(fam.bits["base"])  # a row for every run and tensor
    bad = [r for r in rows if r[2] != "ok"]
    assert bad and all(r[0] == "dapo" and r[2] == "read_error" for r in bad)
    assert all("short read" in r[3] and shard.name in r[3] and r[1] in r[3] for r in bad)
    cons = dict(
        con.execute(
            f"SELECT tensor, n_runs FROM read_parquet('{out}/tables/consistency/*.parquet')"
        ).fetchall()
    )
    assert all(cons[t] == len(runs) - 1 for _, t, _, _ in bad)
    assert len(cons) == len(fam.bits["base"])  # one consistency row per tensor, none twice


def test_a_worker_keeps_only_the_current_groups_files_open(qwen_family, llama_family, tmp_path):
    """Units of one group after another: the first group's checkpoints are closed."""
    import contextlib
    import os

    def plan_for(fam):
        cks = [
            (RunSpec(n, str(p), "fp"), open_checkpoint(str(p), fingerprint=False))
            for n, p in fam.runs.items()
        ]
        group = Group(
            name="g",
            base=str(fam.base),
            runs=[Run(name=n, checkpoint=str(p)) for n, p in fam.runs.items()],
        )
        return plan_group(
            group, open_checkpoint(str(fam.base)), cks, Params(geometry=False), 1 << 28
        )

    worker = ScanWorker(str(tmp_path / "out"))

    def fds():
        out = set()
        for f in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
                out.add(os.readlink(f"/proc/self/fd/{f}"))
        return out

    for u in plan_for(qwen_family).units:
        worker.run_unit(u)
    assert any(str(qwen_family.base) in f for f in fds())
    for u in plan_for(llama_family).units:
        worker.run_unit(u)
    assert set(worker._open) == {str(llama_family.base), *map(str, llama_family.runs.values())}
    assert not any(str(qwen_family.base) in f for f in fds())
