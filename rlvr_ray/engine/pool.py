"""A pool of actors that runs work units: hand them out, take reports back, replace lost actors.

Two parts. :class:`UnitQueue` is the dispatch policy as plain logic (no Ray): which unit an
actor gets next, what a lost actor's units cost, when a unit is given up. :class:`ActorPool`
runs it on Ray: it starts the actors, keeps up to ``UNITS_IN_FLIGHT`` units on each (it runs
them in order, so the next one is there when the running one ends, without a round trip to the
driver in between), and when an actor, its process or its node dies, charges the units it held
an attempt and runs them again on a fresh actor (units are idempotent: fixed part names).

What goes wrong comes back as :class:`~rlvr_ray.engine.failures.Failure` records: a unit that
raised (``unit_error``), one lost ``MAX_ATTEMPTS`` times (``gave_up``), units no actor could be
placed for (``not_placed``), and the results directory filling up (``disk_full``, after which
nothing more is handed out).

The actor class needs ``ping()`` (returns once the actor is ready) and ``run_unit(unit)``
(returns the unit's report); units need ``scan_id``, ``index``, ``group`` and ``nbytes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rlvr_ray.engine.failures import (
    DISK_FULL,
    GAVE_UP,
    NOT_PLACED,
    Failure,
    remote_line,
    unit_failure,
)

MAX_ATTEMPTS = 4  # runs of one unit before it is given up (actor, process or node lost)
UNITS_IN_FLIGHT = 2  # per actor: the one it runs and the next (no idle round trip between)
PLACEMENT_TIMEOUT_S = 300  # no actor at all could be placed for this long: give up
WAIT_S = 10  # longest wait for any call to come back before checking the placement timeout


def may_stack(nbytes: int, queued: int, n_actors: int, left: int) -> bool:
    """Whether the queue's next unit (``nbytes``; ``queued`` units of ``left`` bytes in the
    queue, itself included) may wait behind an actor's running unit rather than for the first
    actor to be free: only while every other actor (live or starting) can still get a unit,
    and only if it is no more than its share of what is left per actor (which actor frees
    first is not known yet: a big unit stacked on a busy actor would end the scan late)."""
    return queued > n_actors and nbytes * n_actors <= left


def unit_key(unit) -> tuple[str, int]:
    return (unit.scan_id, unit.index)


class UnitQueue:
    """The units still to run, largest first (it balances the tail), and the attempts charged
    to each. A unit lost once runs alone afterwards: a unit that kills its actor every time
    costs another unit at most one of its ``max_attempts`` attempts."""

    def __init__(
        self, units: Sequence, max_attempts: int = MAX_ATTEMPTS, in_flight: int = UNITS_IN_FLIGHT
    ) -> None:
        self.units = sorted(units, key=lambda u: -u.nbytes)
        self.left = sum(u.nbytes for u in self.units)  # bytes in the queue
        self.attempts: dict[tuple[str, int], int] = {}
        self.max_attempts = max_attempts
        self.in_flight = in_flight

    def __len__(self) -> int:
        return len(self.units)

    def was_lost(self, unit) -> bool:
        return unit_key(unit) in self.attempts

    def take(self, held: Sequence, n_actors: int):
        """The unit for an actor that holds ``held`` (its units not reported yet, the running
        one first) among ``n_actors`` live or starting actors, or None: it waits."""
        if not self.units or len(held) >= self.in_flight:
            return None
        nxt = self.units[0]
        if held and (
            not may_stack(nxt.nbytes, len(self.units), n_actors, self.left)
            or self.was_lost(nxt)
            or any(self.was_lost(u) for u in held)
        ):
            return None
        self.units.pop(0)
        self.left -= nxt.nbytes
        return nxt

    def lost(self, units: Sequence) -> tuple[list, list]:
        """Charge each of ``units`` (held by an actor that is gone) an attempt; -> (units queued
        again, at the front; units given up after ``max_attempts``)."""
        back, gave_up = [], []
        for u in units:
            self.attempts[unit_key(u)] = n = self.attempts.get(unit_key(u), 0) + 1
            (back if n < self.max_attempts else gave_up).append(u)
        self.units[:0] = back
        self.left += sum(u.nbytes for u in back)
        return back, gave_up

    def clear(self) -> list:
        """Empty the queue; -> the units it held."""
        units, self.units, self.left = self.units, [], 0
        return units


class ActorPool:
    """Runs units on ``n_actors`` actors of ``actor_cls`` (made remote here, never restarted by
    Ray: the pool replaces lost ones itself), each created as ``actor_cls(*args)`` with Ray
    ``options``. ``on_done(unit, report)`` is called in the driver with each unit that came
    back, ``report`` None when it failed (its failure is in ``failures``)."""

    def __init__(
        self,
        actor_cls: type,
        n_actors: int,
        options: dict | None = None,
        args: tuple = (),
        *,
        on_done: Callable[[Any, dict | None], None] | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        in_flight: int = UNITS_IN_FLIGHT,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ) -> None:
        import ray
        from ray.exceptions import ActorUnschedulableError, RayActorError, WorkerCrashedError

        self._ray = ray
        self._lost_errors = (RayActorError, WorkerCrashedError, ActorUnschedulableError)
        self._remote = ray.remote(max_restarts=0, max_task_retries=0)(actor_cls)
        self.options = dict(options or {})
        self.args = args
        self.on_done = on_done
        self.max_attempts = max_attempts
        self.in_flight = in_flight
        self.placement_timeout_s = placement_timeout_s
        self.failures: list[Failure] = []
        self.retried: list[str] = []  # "group G: unit N: ErrorType", one per unit run again
        self.n_done = 0  # units whose report came back
        self.first_given: float | None = None  # perf_counter of the first unit handed out
        self.last_back: float | None = None  # ... and of the last one that came back
        self._starting: dict = {}  # ping ref -> actor
        self._held: dict = {}  # live actor -> refs of its units not reported yet, oldest first
        self._running: dict = {}  # task ref -> (actor, unit)
        self._actors: list = []  # every actor that became ready (killed at the end)
        for _ in range(n_actors):
            self.start()

    # -- the parts ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start one actor; it takes units once its ping returns."""
        actor = self._remote.options(**self.options).remote(*self.args)
        self._starting[actor.ping.remote()] = actor

    def trim(self, n: int) -> None:
        """Stop the actors still starting beyond ``n`` (at least one is kept): a pool started
        before its units were known may have more than it needs."""
        surplus = self.n_actors - max(1, n)
        for ref in list(self._starting)[: max(0, surplus)]:
            self._ray.kill(self._starting.pop(ref), no_restart=True)

    @property
    def n_actors(self) -> int:
        """Actors live or starting."""
        return len(self._held) + len(self._starting)

    def give(self, actor, queue: UnitQueue) -> None:
        """Fill ``actor``'s in-flight units from ``queue``."""
        held = self._held[actor]
        while (unit := queue.take([self._running[r][1] for r in held], self.n_actors)) is not None:
            ref = actor.run_unit.remote(unit)
            self._running[ref] = (actor, unit)
            held.append(ref)
            self.first_given = self.first_given or time.perf_counter()

    def done(self, ref, unit, queue: UnitQueue) -> None:
        """A unit's call came back: pass its report on, or record its error (a full disk stops
        the handing out: every later unit would fail the same way). An actor that is gone
        raises its Ray error to the caller."""
        try:
            report = self._ray.get(ref)
        except self._lost_errors:
            raise
        except Exception as e:  # a bug or an unreadable input: record it, keep going
            report = None
            self.failures.append(failure := unit_failure(unit, e, remote_line(e)))
            if failure.kind == DISK_FULL:
                queue.clear()
        else:
            self.n_done += 1
        self.last_back = time.perf_counter()
        if self.on_done is not None:
            self.on_done(unit, report)

    def lose(self, actor, err: BaseException, queue: UnitQueue) -> None:
        """``actor`` (its process or node) is gone: each unit it held and did not report back is
        charged an attempt and queued again, or given up (the driver cannot tell which was
        running: a unit's reply can die with its process); one fresh actor is started."""
        self._ray.kill(actor, no_restart=True)
        unreported = []
        for ref in self._held.pop(actor):
            _, unit = self._running.pop(ref)
            if self._ray.wait([ref], timeout=0)[0]:  # it may have finished before the actor went
                try:
                    self.done(ref, unit, queue)
                    continue
                except self._lost_errors:
                    pass
            unreported.append(unit)
        back, gave_up = queue.lost(unreported)
        self.retried += [f"group {u.group}: unit {u.index}: {type(err).__name__}" for u in back]
        for u in gave_up:
            self.failures.append(
                Failure(
                    GAVE_UP,
                    u.group,
                    f"failed {self.max_attempts} times; last: {type(err).__name__}",
                    unit=u.index,
                )
            )
        self.start()

    def _placement_failed(self, queue: UnitQueue) -> None:
        for u in queue.clear():
            self.failures.append(
                Failure(
                    NOT_PLACED,
                    u.group,
                    f"no actor could be placed in "
                    f"{self.placement_timeout_s:g} s (asked for "
                    f"{self.options})",
                    unit=u.index,
                )
            )

    def _start_failed(self, queue: UnitQueue, n: int, err: BaseException) -> None:
        why = f"no actor could start ({n} died before they were ready; last: {remote_line(err)})"
        for u in queue.clear():
            self.failures.append(Failure(NOT_PLACED, u.group, why, unit=u.index))

    # -- the loop -----------------------------------------------------------------------------

    def run(self, units: Sequence) -> None:
        """Run ``units`` to the end (each reported, failed or given up), then kill the actors."""
        queue = UnitQueue(units, self.max_attempts, self.in_flight)
        self.trim(len(units))
        try:
            self._loop(queue)
        finally:
            self.shutdown()

    def _loop(self, queue: UnitQueue) -> None:
        ray = self._ray
        waiting_since = time.monotonic()
        dead_starts = 0  # actors in a row that died before they were ready
        while queue or self._running:
            for actor in list(self._held):
                self.give(actor, queue)
            if not self._running and not self._starting:
                self.start()
            timeout = min(WAIT_S, self.placement_timeout_s)
            ready, _ = ray.wait([*self._running, *self._starting], num_returns=1, timeout=timeout)
            if not ready:
                if (
                    not self._running
                    and time.monotonic() - waiting_since > self.placement_timeout_s
                ):
                    self._placement_failed(queue)
                continue
            ref = ready[0]
            waiting_since = time.monotonic()
            if ref in self._starting:
                actor = self._starting.pop(ref)
                try:
                    ray.get(ref)
                    self._actors.append(actor)
                    self._held[actor] = []
                    dead_starts = 0
                except self._lost_errors as e:  # the loop starts another if none is left
                    dead_starts += 1
                    if dead_starts >= self.max_attempts and not self._held:
                        self._start_failed(queue, dead_starts, e)
                continue
            actor = self._running[ref][0]
            held = self._held[actor]
            while ref in held:  # an actor runs its calls in order: take them in order, up to ref
                first = held[0]
                try:
                    self.done(first, self._running[first][1], queue)
                except self._lost_errors as e:  # the actor, its process or its node is gone
                    self.lose(actor, e, queue)
                    break
                held.pop(0)
                self._running.pop(first)

    def shutdown(self) -> None:
        """Kill every actor the pool started."""
        for actor in [*self._actors, *self._starting.values()]:
            self._ray.kill(actor, no_restart=True)
        self._actors, self._starting, self._held = [], {}, {}
