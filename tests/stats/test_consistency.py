"""Consensus histogram and Jaccard against numpy pairwise computations."""

from itertools import combinations

import numpy as np
import pytest
import torch

from rlvr_ray.stats.consistency import ConsistencyAccumulator, consistency


def np_reference(masks):
    R = len(masks)
    count = np.sum(masks, axis=0)
    counts = [int((count == c).sum()) for c in range(R + 1)]
    js, bs = [], []
    n = masks[0].size
    for a, b in combinations(range(R), 2):
        inter = (masks[a] & masks[b]).sum()
        union = (masks[a] | masks[b]).sum()
        if union:
            js.append(inter / union)
            p, q = masks[a].sum() / n, masks[b].sum() / n
            bs.append(p * q / (p + q - p * q))
    return counts, np.mean(js), np.mean(bs), count


@pytest.mark.parametrize("R", [2, 3, 5, 13, 16, 17, 33])
def test_consistency_matches_numpy(R):
    rng = np.random.default_rng(R)
    pref = rng.random((40, 1)) * rng.random((1, 30))  # shared stripes: above-chance overlap
    masks = [rng.random((40, 30)) < 0.2 + pref for _ in range(R)]
    cs = consistency([torch.from_numpy(m) for m in masks])
    counts, mj, base, count = np_reference(masks)
    assert cs.consensus_counts == counts
    assert cs.mean_jaccard == pytest.approx(mj, rel=1e-12)
    assert cs.jaccard_baseline == pytest.approx(base, rel=1e-12)
    assert cs.mean_jaccard > cs.jaccard_baseline  # planted stripes
    np.testing.assert_allclose(cs.row_consensus.numpy(), count.mean(axis=1) / R, rtol=1e-12)
    np.testing.assert_allclose(cs.col_consensus.numpy(), count.mean(axis=0) / R, rtol=1e-12)


def test_chunked_equals_whole():
    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(rng.random((50, 20)) < 0.4) for _ in range(4)]
    whole = consistency(masks)
    acc = ConsistencyAccumulator(4, 50, 20)
    for a in range(0, 50, 7):
        planes = acc.planes(min(7, 50 - a))
        for k, m in enumerate(masks):
            planes[0] |= m[a : a + 7].to(torch.int16) << k
        acc.add(planes)
    total = torch.stack([m.long() for m in masks]).sum(0)
    part = acc.finish(total.sum(1), total.sum(0))
    assert part.consensus_counts == whole.consensus_counts
    assert part.intersections == whole.intersections


def test_empty_masks_have_no_jaccard():
    cs = consistency([torch.zeros(4, 4, dtype=torch.bool)] * 3)
    assert cs.consensus_counts == [16, 0, 0, 0]
    assert cs.mean_jaccard is None and cs.jaccard_baseline is None
