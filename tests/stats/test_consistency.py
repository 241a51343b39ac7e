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


def dense_masks(R, shape, seed):
    """R masks changing 70-95% of the coordinates (column stripes shared by every run), as
    numpy bools: pairwise intersections and 'changed by >= c runs' counts above 2^24 once the
    tensor has 2^25 elements."""
    rng = np.random.default_rng(seed)
    thr = (180 + np.arange(shape[1]) % 64).astype(np.uint8)  # P(changed) = thr / 256 per column
    return [rng.integers(0, 256, shape, dtype=np.uint8) < thr for _ in range(R)]


def int64_reference(masks):
    """(consensus counts [R + 1], sizes [R], intersections {(r, s): int}, mean Jaccard),
    computed from the masks with int64 counts only (packed bits and popcounts)."""
    R = len(masks)
    count = np.zeros(masks[0].shape, dtype=np.uint8)
    for m in masks:
        count += m
    counts = np.bincount(count.reshape(-1), minlength=R + 1).astype(np.int64).tolist()
    packed = [np.packbits(m.reshape(-1)) for m in masks]
    sizes = [int(np.bitwise_count(p).sum(dtype=np.int64)) for p in packed]
    inter = {
        (a, b): int(np.bitwise_count(packed[a] & packed[b]).sum(dtype=np.int64))
        for a, b in combinations(range(R), 2)
    }
    js = [i / (sizes[a] + sizes[b] - i) for (a, b), i in inter.items()]
    return counts, sizes, inter, sum(js) / len(js)


def planes_of(masks):
    """The R masks as int16 bit planes (bit r % 16 of plane r // 16), as the mask passes set."""
    planes = [np.zeros(masks[0].shape, dtype=np.int16) for _ in range((len(masks) + 15) // 16)]
    for r, m in enumerate(masks):
        planes[r // 16] |= m.astype(np.int16) << np.int16(r % 16)
    return [torch.from_numpy(p) for p in planes]


def check_exact(cs, masks):
    counts, sizes, inter, mj = int64_reference(masks)
    assert cs.consensus_counts == counts
    assert cs.sizes == sizes
    assert cs.intersections == inter
    assert cs.mean_jaccard == pytest.approx(mj, rel=1e-15)


class _Recording(ConsistencyAccumulator):
    """Records how many coordinates each float32 piece covers."""

    def _add_piece(self, planes):
        self.pieces.append(planes[0].numel())
        super()._add_piece(planes)


@pytest.mark.parametrize("R", [3, 17, 32])
def test_chunk_is_counted_in_exact_pieces(R):
    """A chunk handed in at once is consumed in float32 pieces of at most ``piece_numel``
    coordinates (the exactness limit, 2^24 by default, shrunk here to 1000) that cover it
    exactly; the counts equal the int64 reference."""
    masks = dense_masks(R, (61, 47), R)
    acc = _Recording(R, 61, 47, piece_numel=1000)
    acc.pieces = []
    acc.add(planes_of(masks))
    assert acc.pieces == [1000] * 2 + [61 * 47 - 2000]
    check_exact(acc.finish(torch.zeros(61, dtype=torch.int64), torch.zeros(47)), masks)
    with pytest.raises(ValueError, match=r"piece_numel must be in \[1, 2\^24\], not 16777217"):
        ConsistencyAccumulator(R, 61, 47, piece_numel=(1 << 24) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("R", [17, 32])
def test_counts_exact_above_2_24_elements(R):
    """2 x (2^24 + 1) coordinates, 70-95% changed in every run, the whole tensor handed in as
    one chunk (as the fused pass hands in a tensor read whole): every consensus count and
    intersection exceeds what float32 holds exactly, and all equal the int64 reference."""
    shape = (2, (1 << 24) + 1)
    masks = dense_masks(R, shape, R)
    acc = ConsistencyAccumulator(R, *shape)
    acc.add(planes_of(masks))
    check_exact(acc.finish(torch.zeros(2, dtype=torch.int64), torch.zeros(shape[1])), masks)
