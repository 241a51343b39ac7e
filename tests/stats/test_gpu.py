"""The statistics on a CUDA device against the CPU float64 reference (skipped without one).

GPU SVDs and eigensolvers of nearly identical matrices are known to misbehave, so the GPU path is
held to the same bars as the CPU path: ``pytest -m gpu tests/stats/test_gpu.py`` on a GPU machine.
"""

import numpy as np
import pytest
import torch
from spectral_ref import _check_against_reference, _powerlaw_bf16, _ulp_update

from rlvr_ray.stats.consistency import ConsistencyAccumulator
from rlvr_ray.stats.group import GroupAccumulator
from rlvr_ray.stats.masks import MaskAccumulator
from rlvr_ray.stats.spectral import base_geometry
from rlvr_ray.stats.update import update_geometry

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["krylov", "eigh"])
@pytest.mark.parametrize(("shape", "k"), [((192, 192), 16), ((320, 96), 24), ((48, 256), 16)])
def test_gpu_geometry_of_ulp_updates_matches_float64_reference(shape, k, method):
    w0 = _powerlaw_bf16(*shape, seed=10)
    w1 = _ulp_update(w0, seed=11)
    out = _check_against_reference(w0, w1, k, 1e-4, 1e-6, method, device="cuda")
    assert 1e-6 < out.nss < 1e-3


@pytest.mark.parametrize("shape", [(896, 896), (4864, 896), (896, 4864)])
def test_gpu_geometry_at_real_shapes(shape):
    w0 = _powerlaw_bf16(*shape, seed=70)
    w1 = _ulp_update(w0, seed=71)
    _check_against_reference(w0, w1, 64, 1e-4, 1e-6, device="cuda")


def test_gpu_sft_like_update():
    w0 = _powerlaw_bf16(160, 128, seed=20)
    gen = torch.Generator().manual_seed(21)
    noise = 0.006 * torch.randn(160, 128, generator=gen, dtype=torch.float64)
    w1 = (w0.double() + noise).to(torch.bfloat16)
    out = _check_against_reference(w0, w1, 16, angle_rtol=1e-9, nss_rtol=1e-9, device="cuda")
    assert 0.1 < out.max_angle_right < 1.5


def test_gpu_mask_and_consistency_equal_cpu():
    """The torch path on CUDA and the CPU's fused pass give identical counts."""
    w0 = _powerlaw_bf16(300, 257, seed=1)
    runs = [_ulp_update(w0, seed=s, share=0.3) for s in range(3)]
    b0 = w0.view(torch.int16)
    edges = (1, 2, 3, 4, 5, 9, 17, 65)
    cuts = [*range(0, 300, 19), 300]  # chunks straddle the map's row bins
    accs = [MaskAccumulator(300, 257, edges, "cuda", 16) for _ in runs]
    cons = ConsistencyAccumulator(3, 300, 257, "cuda")
    for x, y in zip(cuts, cuts[1:]):
        planes = cons.planes(y - x)
        for k, (acc, w1) in enumerate(zip(accs, runs)):
            acc.add(b0[x:y].cuda(), w1.view(torch.int16)[x:y].cuda(), planes, k)
        cons.add(planes)
    assert not any(acc.nonfinite() for acc in accs)
    stats = [acc.finish() for acc in accs]
    got = {
        "cuda": (
            stats,
            cons.finish(sum(a.row_counts for a in accs), sum(a.col_counts for a in accs)),
        )
    }
    group = GroupAccumulator(300, 257, 3, [0, 1, 2], edges, 16)
    flat = torch.cat([b0.reshape(-1), *(w.view(torch.int16).reshape(-1) for w in runs)]).numpy()
    off = np.arange(4, dtype=np.int64) * 300 * 257
    for x, y in zip(cuts, cuts[1:]):
        group.add(flat, off + x * 257, y - x)
    group.finish()
    got["cpu"] = ([group.mask_stats(k) for k in range(3)], group.consistency())
    (sc, cc), (sg, cg) = got["cpu"], got["cuda"]
    for a, b in zip(sc, sg):
        assert (a.n_changed, a.ulp_hist, a.ulp_max) == (b.n_changed, b.ulp_hist, b.ulp_max)
        assert a.max_abs_update == b.max_abs_update
        assert a.update_sumsq == pytest.approx(b.update_sumsq, rel=1e-13)
        assert np.array_equal(a.row_ratio, b.row_ratio.cpu().numpy())
        assert np.array_equal(a.pooled, b.pooled.cpu().numpy())
    assert cc.consensus_counts == cg.consensus_counts and cc.intersections == cg.intersections
    assert np.array_equal(cc.col_consensus, cg.col_consensus.cpu().numpy())


@pytest.mark.parametrize("rank", [1, 7, None])
def test_gpu_update_rank_matches_numpy(rank):
    """update_geometry on CUDA: numpy's matrix_rank on planted exact-rank bf16 updates."""
    rng = np.random.default_rng(5)
    w0 = rng.integers(-100, 101, (96, 64)) / 16
    if rank is None:
        dw = rng.integers(-3, 4, w0.shape) / 16
    else:
        dw = (rng.integers(-2, 3, (96, rank)) @ rng.integers(-2, 3, (rank, 64))) / 16
    t0, t1 = (torch.from_numpy(w).to(torch.bfloat16) for w in (w0, w0 + dw))
    got = update_geometry(base_geometry(t0.cuda(), rank_k=3, spectral_k=4), t0.cuda(), t1.cuda())
    s = np.linalg.svd(dw, compute_uv=False)
    assert got.update_rank == np.linalg.matrix_rank(dw) == (rank or 64)
    assert got.update_stable_rank == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-10)
