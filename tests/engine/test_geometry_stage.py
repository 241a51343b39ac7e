"""The worker's geometry stage against float64 numpy/scipy, and the base decomposition cache."""

import numpy as np
import pytest
import scipy.linalg

from rlvr_ray.engine.config import Params
from rlvr_ray.engine.worker import ScanWorker
from rlvr_ray.lab.planted import bf16_bits_to_f64, f32_to_bf16_bits, write_checkpoint

from .test_worker import np_mask, scan


def top_alpha(score, alpha):
    """Reference tie rule: exactly floor(alpha * n + 0.5) entries, ties to the lower flat index."""
    flat = score.ravel()
    k = int(np.floor(alpha * flat.size + 0.5))
    order = np.lexsort((np.arange(flat.size), -flat))  # score descending, index ascending
    out = np.zeros(flat.size, bool)
    out[order[:k]] = True
    return out.reshape(score.shape)


def test_geometry_columns_match_float64_reference(qwen_family, tmp_path):
    fam = qwen_family
    params = Params(rank_k=4, spectral_k=6, alpha=0.5)
    con, _, plan = scan(
        tmp_path, fam.base, {"sft": fam.runs["sft"], "grpo-a": fam.runs["grpo-a"]}, params
    )
    name = "model.layers.1.mlp.gate_proj.weight"  # [64, 32]
    for run in ["sft", "grpo-a"]:
        row = con.execute(
            "SELECT geometry_status, overlap_princ, princ_density, overlap_low, low_density, "
            "overlap_princ_not_low, nss, max_angle_left, max_angle_right, spectral_k, rank_k "
            "FROM tensors WHERE run = ? AND tensor = ?",
            [run, name],
        ).fetchone()
        b0, b1 = fam.bits["base"][name], fam.bits[run][name]
        w0, w1 = bf16_bits_to_f64(b0), bf16_bits_to_f64(b1)
        m = np_mask(b0, b1)
        u0, s0, vt0 = np.linalg.svd(w0)
        u1, s1, vt1 = np.linalg.svd(w1)
        princ = top_alpha(np.abs((u0[:, :4] * s0[:4]) @ vt0[:4]), 0.5)
        low = top_alpha(-np.abs(w0), 0.5)
        assert row[0] == "ok" and row[9:] == (6, 4)
        assert row[1] == pytest.approx((princ & m).sum() / m.sum(), abs=1e-12)
        assert row[2] == pytest.approx(princ.mean(), abs=1e-12)
        assert row[3] == pytest.approx((low & m).sum() / m.sum(), abs=1e-12)
        assert row[4] == pytest.approx(low.mean(), abs=1e-12)
        assert row[5] == pytest.approx((princ & ~low & m).sum() / m.sum(), abs=1e-12)
        assert row[6] == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-3)
        left = scipy.linalg.subspace_angles(u0[:, :6], u1[:, :6]).max()
        right = scipy.linalg.subspace_angles(vt0[:6].T, vt1[:6].T).max()
        assert row[7] == pytest.approx(left, rel=1e-2, abs=1e-9)
        assert row[8] == pytest.approx(right, rel=1e-2, abs=1e-9)
        bound = con.execute(
            "SELECT angle_error_bound FROM tensors WHERE run = ? AND tensor = ?", [run, name]
        ).fetchone()[0]
        assert abs(row[7] - left) <= bound + 1e-12 and abs(row[8] - right) <= bound + 1e-12
        assert bound < 2.01e-3 * max(left, right) or bound < 1e-9  # certified to the target
    spectra = con.execute(
        "SELECT i, sigma_base, sigma_run FROM read_parquet(?) WHERE run = 'sft' "
        "AND tensor = ? ORDER BY i",
        [str(tmp_path / "out/tables/spectra/*.parquet"), name],
    ).fetchall()
    s0 = np.linalg.svd(bf16_bits_to_f64(fam.bits["base"][name]), compute_uv=False)
    s1 = np.linalg.svd(bf16_bits_to_f64(fam.bits["sft"][name]), compute_uv=False)
    np.testing.assert_allclose([r[1] for r in spectra], s0[:6], rtol=1e-9)
    np.testing.assert_allclose([r[2] for r in spectra], s1[:6], rtol=1e-9)
    statuses = dict(
        con.execute("SELECT tensor, geometry_status FROM tensors WHERE run = 'sft'").fetchall()
    )
    assert statuses["model.norm.weight"] == "skipped_vector"
    assert statuses["model.embed_tokens.weight"] == "skipped_embedding"
    assert statuses["model.layers.0.self_attn.q_proj.bias"] == "skipped_vector"


def test_base_decompositions_are_cached_across_scans(qwen_family, tmp_path):
    fam = qwen_family
    params = Params(rank_k=4, spectral_k=6)
    _, _, plan = scan(tmp_path, fam.base, {"grpo-a": fam.runs["grpo-a"]}, params)
    # a new scan (another run) of the same base in the same results directory: no new SVDs
    _, _, plan2 = scan(tmp_path, fam.base, {"dapo": fam.runs["dapo"]}, params)
    assert plan2.scan_id != plan.scan_id
    w = ScanWorker(str(tmp_path / "out"))
    for u in plan2.units:
        w.run_unit(u)
    n_matrices = sum(
        1
        for k, v in fam.bits["base"].items()
        if v.ndim == 2 and "embed" not in k and "lm_head" not in k
    )
    assert (w.cache.hits, w.cache.misses) == (n_matrices, 0)
    cached = list((tmp_path / "out" / "cache").rglob("*.safetensors"))
    assert len(cached) == n_matrices


def test_default_k_follows_each_matrix_short_side(qwen_family, tmp_path):
    """Default params: k = floor(0.0417 * min(rows, cols) + 0.5), at least 1, per tensor, with
    geometry_status and sigma_gap from the base's float64 singular values."""
    fam = qwen_family
    con, _, _ = scan(tmp_path, fam.base, {"grpo-a": fam.runs["grpo-a"]}, Params())
    got = con.execute(
        "SELECT tensor, rank_k, spectral_k, geometry_status, sigma_gap FROM tensors "
        "WHERE nss IS NOT NULL"
    ).fetchall()
    bases = fam.bits["base"]
    matrices = [k for k, v in bases.items() if v.ndim == 2 and not k.startswith(("model.e", "lm"))]
    assert sorted(r[0] for r in got) == sorted(matrices)
    for tensor, rank_k, spectral_k, status, gap in got:
        s = np.linalg.svd(bf16_bits_to_f64(fam.bits["base"][tensor]), compute_uv=False)
        k = max(1, int(np.floor(0.0417 * s.size + 0.5)))
        assert (rank_k, spectral_k) == (k, k)
        assert gap == pytest.approx((s[k - 1] - s[k]) / s[k - 1], rel=1e-9)
        expected = "k_not_below_rank" if 4 * k > s.size else "small_gap" if gap < 1e-3 else "ok"
        assert status == expected
    assert {r[3] for r in got} == {"ok"}  # random 16- to 64-wide bases: k = 1, a clear gap
    # an absolute k = 64 on these 16- to 64-wide matrices: clipped to the short side, flagged
    con, _, _ = scan(tmp_path / "abs", fam.base, {"grpo-a": fam.runs["grpo-a"]}, Params(rank_k=64))
    rows = con.execute(
        "SELECT DISTINCT geometry_status, rank_k = least(rows, cols) FROM tensors "
        "WHERE nss IS NOT NULL"
    ).fetchall()
    assert rows == [("k_not_below_rank", True)]


def planted_rank_family(root):
    """Base W0 = k / 16 (|k| <= 100, exact in bf16) and three runs whose dW is exactly rank 1,
    rank 7 and full rank (small integers / 16: W1 is exact in bf16 too), on a square, a wide
    and a tall matrix -> (base path, {run: path}, {run: {tensor: float64 dW}}, {tensor: W0})."""
    rng = np.random.default_rng(7)
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (40, 40),
        "model.layers.0.mlp.gate_proj.weight": (72, 40),
        "model.layers.0.mlp.down_proj.weight": (40, 72),
    }
    w0 = {t: rng.integers(-100, 101, s) / 16 for t, s in shapes.items()}
    bits = lambda w: f32_to_bf16_bits(w.astype(np.float32))  # noqa: E731 (exact here)
    base = write_checkpoint(root / "base", {t: bits(w) for t, w in w0.items()}, "qwen2", 1)
    runs, dws = {}, {}
    for run, rank in [("rank1", 1), ("rank7", 7), ("full", None)]:
        dws[run] = {}
        for t, (m, n) in shapes.items():
            if rank is None:
                dws[run][t] = rng.integers(-3, 4, (m, n)) / 16
            else:
                dws[run][t] = (rng.integers(-2, 3, (m, rank)) @ rng.integers(-2, 3, (rank, n))) / 16
        tensors = {t: bits(w0[t] + dws[run][t]) for t in shapes}
        runs[run] = write_checkpoint(root / run, tensors, "qwen2", 1)
    return base, runs, dws, w0


def test_update_rank_and_spectrum_metrics_match_numpy(tmp_path):
    base, runs, dws, w0 = planted_rank_family(tmp_path / "ck")
    k = 3
    con, _, _ = scan(tmp_path, base, runs, Params(rank_k=2, spectral_k=k, full_spectrum=True))
    rows = con.execute(
        "SELECT run, tensor, update_rank, update_stable_rank, update_effective_rank, "
        "update_energy_left, update_energy_right, sigma_max_base, sigma_max_run, "
        "stable_rank_base, stable_rank_run FROM tensors"
    ).fetchall()
    assert len(rows) == 9
    spectra = str(tmp_path / "out/tables/spectra/*.parquet")
    for run, tensor, rank, stable, eff, left, right, smax0, smax1, sr0, sr1 in rows:
        dw = dws[run][tensor]
        w1 = w0[tensor] + dw
        u0, s0, vt0 = np.linalg.svd(w0[tensor])
        s1 = np.linalg.svd(w1, compute_uv=False)
        s = np.linalg.svd(dw, compute_uv=False)
        assert rank == np.linalg.matrix_rank(dw) == {"rank1": 1, "rank7": 7, "full": 40}[run]
        p = s[s > 0] / s.sum()
        energy = (dw**2).sum()
        expected = [
            (s**2).sum() / s[0] ** 2,
            np.exp(-(p * np.log(p)).sum()),
            np.linalg.norm(u0[:, :k].T @ dw) ** 2 / energy,
            np.linalg.norm(dw @ vt0[:k].T) ** 2 / energy,
            s0[0],
            s1[0],
            (s0**2).sum() / s0[0] ** 2,
            (s1**2).sum() / s1[0] ** 2,
        ]
        np.testing.assert_allclose(
            [stable, eff, left, right, smax0, smax1, sr0, sr1], expected, rtol=1e-10
        )
        # full_spectrum: every singular value of base and run, angles null past k
        got = con.execute(
            "SELECT i, sigma_base, sigma_run, angle_left, angle_right FROM "
            "read_parquet(?) WHERE run = ? AND tensor = ? ORDER BY i",
            [spectra, run, tensor],
        ).fetchall()
        assert [r[0] for r in got] == list(range(40))
        np.testing.assert_allclose([r[1] for r in got], s0, rtol=1e-9)
        np.testing.assert_allclose([r[2] for r in got], s1, rtol=1e-9)
        assert all(r[3] is not None and r[4] is not None for r in got[:k])
        assert all(r[3] is None and r[4] is None for r in got[k:])
    # the default keeps the top k rows only
    con, _, _ = scan(
        tmp_path / "topk", base, {"rank1": runs["rank1"]}, Params(rank_k=2, spectral_k=k)
    )
    n = con.execute(
        "SELECT count(*) FROM read_parquet(?)",
        [str(tmp_path / "topk/out/tables/spectra/*.parquet")],
    ).fetchone()[0]
    assert n == 3 * k
