"""The driver's dispatch policy: when a unit may wait behind an actor's running one."""

from __future__ import annotations

from rlvr_ray.engine.pool import may_stack

MB = 1 << 20


def test_a_giant_unit_waits_for_a_free_actor():
    # 2 layers of the 0.5B shapes: embed and lm_head 1361 MB each, then 14 units of ~21 MB.
    # Actor A took the embedding; lm_head must not queue behind it while B starts up
    assert not may_stack(1361 * MB, 15, 2, (1361 + 14 * 21) * MB)


def test_small_units_queue_behind_running_ones():
    assert may_stack(21 * MB, 14, 2, 14 * 21 * MB)
    assert may_stack(150 * MB, 20, 2, 20 * 150 * MB)  # even-sized units: half of what is left
    assert may_stack(150 * MB, 2 * 3, 3, 6 * 150 * MB)


def test_the_last_units_go_one_to_each_actor():
    assert not may_stack(21 * MB, 2, 2, 42 * MB)
    assert not may_stack(21 * MB, 3, 4, 63 * MB)  # starting actors count: they will take them
    assert may_stack(21 * MB, 3, 2, 63 * MB)


def test_a_unit_over_its_share_per_actor_is_not_stacked():
    # 100 MB among 250 MB left on 3 actors: 300 MB > 250 MB
    assert not may_stack(100 * MB, 4, 3, 250 * MB)
    assert may_stack(100 * MB, 4, 2, 250 * MB)  # 200 MB <= 250 MB
