"""Cutting a group's tensors into work units."""

from rlvr_ray.engine.plan import MIN_UNITS, TensorSpec, cut


def specs(sizes):
    return [TensorSpec(f"t{i}", "other", None, None, n, (n,)) for i, n in enumerate(sizes)]


def test_cut_shares_out_what_a_huge_tensor_leaves():
    """A huge first tensor is a piece of its own; the rest is shared out evenly (the old cut
    left a trail of one-tensor pieces behind it), and there are exactly as many pieces as
    asked, contiguous and covering every tensor once."""
    ts = specs([1000] + [10] * 200)
    pieces = cut(ts, unit_bytes=1 << 40)
    assert len(pieces) == MIN_UNITS
    assert [t for p in pieces for t in p] == ts
    assert [t.nbytes for t in pieces[0]] == [1000]
    rest = [sum(t.nbytes for t in p) for p in pieces[1:]]
    assert max(rest) - min(rest) <= 10  # 2000 bytes over 15 pieces: 130 or 140 each


def test_cut_by_bytes_and_one_piece_per_tensor_at_most():
    ts = specs([100] * 64)
    assert len(cut(ts, unit_bytes=100 * 2)) == 32  # 6400 / 200 pieces, two tensors each
    assert all(len(p) == 2 for p in cut(ts, unit_bytes=100 * 2))
    few = specs([5, 1, 1])
    assert cut(few, unit_bytes=1) == [[t] for t in few]
    assert cut([], unit_bytes=1) == []
