"""The actor pool: its dispatch policy as plain logic, and its loop on a real local Ray with
small actor classes that misbehave on purpose (raise, die, never start, fill the disk)."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from rlvr_ray.engine import failures
from rlvr_ray.engine.pool import ActorPool, UnitQueue

MB = 1 << 20


def Job(index: int, nbytes: int) -> SimpleNamespace:  # noqa: N802 (it stands for a unit)
    """What the pool needs of a unit (a stdlib type: actors unpickle it without this module)."""
    return SimpleNamespace(index=index, nbytes=nbytes, scan_id="s", group="g")


def jobs(*sizes: int) -> list[SimpleNamespace]:
    return [Job(i, n) for i, n in enumerate(sizes)]


# -- the queue: plain logic ---------------------------------------------------------------------


def test_the_queue_hands_out_the_largest_first_and_counts_the_bytes_left():
    q = UnitQueue(jobs(10, 30, 20))
    assert [u.index for u in q.units] == [1, 2, 0] and q.left == 60
    assert q.take([], n_actors=2).index == 1 and q.left == 30
    assert q.take([], n_actors=2).index == 2 and len(q) == 1 and q.left == 10


def test_an_actor_holds_at_most_in_flight_units():
    q = UnitQueue(jobs(*[MB] * 10), in_flight=2)
    first = q.take([], n_actors=2)
    second = q.take([first], n_actors=2)  # 9 queued > 2 actors, 1 MB x 2 <= 9 MB left
    assert second is not None
    assert q.take([first, second], n_actors=2) is None  # full
    assert len(q) == 8


def test_a_unit_stacks_behind_a_running_one_only_by_the_stacking_rule():
    # 3 units of 100 MB queued for 3 actors: each other actor can still get one only if it
    # waits (3 queued is not more than 3 actors), so it does not stack
    q = UnitQueue(jobs(100 * MB, 100 * MB, 100 * MB, 100 * MB))
    running = q.take([], n_actors=3)
    assert q.take([running], n_actors=3) is None
    assert q.take([running], n_actors=2) is not None  # 3 queued > 2 actors, 200 <= 300 MB
    # a giant unit never stacks on a busy actor: 1361 MB x 2 > what is left
    q = UnitQueue(jobs(1361 * MB, 1361 * MB, *[21 * MB] * 14))
    running = q.take([], n_actors=2)
    assert q.take([running], n_actors=2) is None


def test_a_lost_unit_is_queued_first_runs_alone_and_is_given_up_after_max_attempts():
    q = UnitQueue(jobs(5, 4, 3, 2, 1), max_attempts=3)
    a, b = q.take([], 1), None
    b = q.take([a], 1)
    assert (a.index, b.index) == (0, 1)
    back, gave_up = q.lost([a, b])  # the actor held both: each is charged one attempt
    assert [u.index for u in back] == [0, 1] and not gave_up
    assert [u.index for u in q.units] == [0, 1, 2, 3, 4] and q.left == 15
    first = q.take([], 1)
    assert first.index == 0 and q.take([first], 1) is None  # lost before: runs alone
    other = q.take([], 1)
    assert other.index == 1 and q.take([other], 1) is None  # lost before, too
    fresh = q.take([], 1)
    assert fresh.index == 2 and q.take([fresh], 1) is not None  # never lost: stacks
    assert q.lost([first]) == ([first], [])  # attempt 2 of 3
    assert q.lost([q.take([], 1)]) == ([], [first])  # attempt 3: given up, not queued
    assert [u.index for u in q.units] == [4]


def test_clearing_the_queue_returns_what_it_held():
    q = UnitQueue(jobs(1, 2, 3))
    assert [u.index for u in q.clear()] == [2, 1, 0] and not q and q.left == 0


# -- the pool on a real Ray ---------------------------------------------------------------------


def make_actor(behaviour: str, marker: str = ""):
    """An actor class (local: Ray ships it by value) that reports ``{"unit", "pid"}`` and
    misbehaves on unit 3 as ``behaviour`` says."""

    class Actor:
        def __init__(self, tag: str) -> None:
            if behaviour == "dies_starting":
                raise RuntimeError("cannot start here")
            self.tag = tag

        def ping(self) -> str:
            return self.tag

        def run_unit(self, unit) -> dict:
            if unit.index == 3:
                if behaviour == "raises":
                    raise ValueError(f"bad unit {unit.index}\nsecond line")
                if behaviour == "dies":
                    os._exit(1)  # the process dies, as under the OOM killer
                if behaviour == "dies_once" and not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)
                if behaviour == "disk_full":
                    raise OSError(errno.ENOSPC, "No space left on device", "/results/x")
            return {"unit": unit.index, "pid": os.getpid()}

    return Actor


def run_pool(behaviour: str, units: list[Job], n_actors: int = 2, marker: str = "", **kw):
    done: list[tuple[int, dict | None]] = []
    held: list[int] = []
    pool = ActorPool(make_actor(behaviour, marker), n_actors, {"num_cpus": 0}, ("t",), **kw)

    def on_done(unit, rep):
        done.append((unit.index, rep))
        held.append(max(len(h) for h in pool._held.values()))

    pool.on_done = on_done
    pool.run(units)
    return pool, done, held


def test_every_unit_runs_once_with_at_most_two_in_flight_per_actor(ray_local):
    units = jobs(*[MB] * 12)
    pool, done, held = run_pool("well", units)
    assert sorted(i for i, _ in done) == list(range(12))
    assert all(rep == {"unit": i, "pid": rep["pid"]} for i, rep in done)
    assert max(held) <= 2 and pool.n_done == 12
    assert not pool.failures and not pool.retried
    assert pool.last_back >= pool.first_given


def test_a_unit_that_raises_is_a_unit_error_with_its_last_line_and_the_others_run(ray_local):
    pool, done, _ = run_pool("raises", jobs(*[MB] * 6))
    assert pool.failures == [
        failures.Failure(failures.UNIT_ERROR, "g", "ValueError: bad unit 3", unit=3)
    ]
    assert pool.failures[0].line == "unit 3 failed: ValueError: bad unit 3"
    assert sorted(i for i, rep in done if rep) == [0, 1, 2, 4, 5]
    assert [i for i, rep in done if rep is None] == [3] and pool.n_done == 5


def test_a_unit_whose_actor_dies_once_is_retried_on_a_fresh_actor(ray_local, tmp_path):
    marker = str(tmp_path / "died")
    pool, done, _ = run_pool("dies_once", jobs(*[MB] * 6), marker=marker)
    assert os.path.exists(marker) and not pool.failures
    assert sorted(i for i, rep in done if rep) == list(range(6))  # each reported exactly once
    assert "group g: unit 3: ActorDiedError" in pool.retried
    assert len({rep["pid"] for _, rep in done}) >= 2


def test_a_unit_that_kills_every_actor_is_given_up_after_max_attempts(ray_local):
    pool, done, _ = run_pool("dies", jobs(*[MB] * 5), max_attempts=2)
    assert pool.failures == [
        failures.Failure(failures.GAVE_UP, "g", "failed 2 times; last: ActorDiedError", unit=3)
    ]
    assert pool.failures[0].line == "unit 3 failed 2 times; last: ActorDiedError"
    assert pool.retried.count("group g: unit 3: ActorDiedError") == 1
    assert sorted(i for i, rep in done if rep) == [0, 1, 2, 4]


def test_a_full_disk_stops_handing_out_units(ray_local):
    # one actor, one unit at a time: unit 3 fills the disk, so 2, 1, 0 (smaller) never run
    units = [Job(i, 100 - i) for i in range(8)]
    pool, done, _ = run_pool("disk_full", units, n_actors=1, in_flight=1)
    assert pool.failures == [
        failures.Failure(failures.DISK_FULL, "g", "results directory full", unit=3)
    ]
    assert [i for i, _ in done] == [0, 1, 2, 3]


def test_units_no_actor_can_be_placed_for_are_not_placed_after_the_timeout(ray_local):
    units = jobs(MB, MB)
    pool = ActorPool(
        make_actor("well"),
        1,
        {"num_cpus": 0, "resources": {"no_such": 1}},
        ("t",),
        placement_timeout_s=1,
    )
    pool.run(units)
    assert [(f.kind, f.unit) for f in pool.failures] == [
        (failures.NOT_PLACED, 0),
        (failures.NOT_PLACED, 1),
    ]
    assert pool.failures[0].message.startswith("no actor could be placed in 1 s (asked for {")
    assert pool.n_done == 0


def test_actors_that_die_before_they_are_ready_end_the_pool_instead_of_looping(ray_local):
    pool, done, _ = run_pool("dies_starting", jobs(MB, MB, MB), n_actors=1, max_attempts=2)
    assert not done and [f.kind for f in pool.failures] == [failures.NOT_PLACED] * 3
    msg = pool.failures[0].message
    assert msg.startswith("no actor could start (2 died before they were ready; last: ")
    assert "cannot start here" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", sorted(failures.GROUP_KINDS | failures.UNIT_KINDS))
def test_every_kind_has_a_line(kind):
    assert failures.Failure(kind, "g", "why", run="r", unit=1).line.endswith("why")
