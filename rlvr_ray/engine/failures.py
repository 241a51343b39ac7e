"""What could not be scanned, as data: a kind, the group, the run, the unit and one line.

Callers (the CLI, the Hub watch) decide on the fields, never on the text of the message.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from rlvr_ray.io.checkpoint import CheckpointError

# kinds of failure
BAD_BASE = "bad_base"  # the group's base could not be opened
BAD_RUN = "bad_run"  # one run's checkpoint could not be opened (``run`` says which)
NO_RUNS = "no_runs"  # no run of the group could be opened
BAD_PLAN = "bad_plan"  # the group could not be planned
OVER_BUDGET = "over_budget"  # a unit's largest tensor does not fit the memory per actor
UNIT_ERROR = "unit_error"  # a unit raised (an unreadable input or a bug)
GAVE_UP = "gave_up"  # a unit lost its actor MAX_ATTEMPTS times
NOT_PLACED = "not_placed"  # no actor could be placed to run the unit
DISK_FULL = "disk_full"  # the results directory filled up: the scan stopped early

#: kinds that hold every run of the group (the run is not to blame)
GROUP_KINDS = frozenset({BAD_BASE, NO_RUNS, BAD_PLAN})
#: kinds of a unit that holds tensors of every run of its group
UNIT_KINDS = frozenset({OVER_BUDGET, UNIT_ERROR, GAVE_UP, NOT_PLACED})


@dataclass(frozen=True)
class Failure:
    """One thing that could not be scanned: a run of a group (``run``), a unit (``unit``:
    its tensors of every run), or the whole group (both None)."""

    kind: str
    group: str
    message: str  # one line
    run: str | None = None
    unit: int | None = None

    @property
    def line(self) -> str:
        """What was skipped and why, in one line (without the group)."""
        prefix = {
            BAD_BASE: "base skipped: ",
            BAD_RUN: f"run {self.run} skipped: ",
            NO_RUNS: "group skipped: ",
            BAD_PLAN: "group skipped: ",
            OVER_BUDGET: f"unit {self.unit} refused: ",
            UNIT_ERROR: f"unit {self.unit} failed: ",
            GAVE_UP: f"unit {self.unit} ",  # the message says "failed N times; last: ..."
            NOT_PLACED: f"unit {self.unit} not run: ",
            DISK_FULL: f"unit {self.unit} not written: ",
        }[self.kind]
        return prefix + self.message


def one_line(e: BaseException, ref: str | None = None) -> str:
    """A failure as one line: a CheckpointError's own message (it names the checkpoint, file
    and tensor); anything else as ``[ref: ]Type: first line``."""
    if isinstance(e, CheckpointError):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    lines = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return f"{ref}: {msg}" if ref else msg


def remote_line(e: BaseException) -> str:
    """A remote call's error as one line: the error raised in the actor (Ray keeps it as the
    ``cause`` of the error it raises here) as :func:`one_line` writes it, else the last line
    of Ray's text (its traceback ends with the original ``Type: message``)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return one_line(cause)
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (an OSError, or a Ray / DuckDB / Arrow error carrying one) is ENOSPC."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def unit_failure(unit, e: BaseException, message: str) -> Failure:
    """The failure of ``unit``, which raised ``e`` (``message``: ``e`` as one line):
    ``disk_full`` when the results directory filled up (every later unit would fail the same
    way: the pool stops handing units out), else ``unit_error``."""
    if is_disk_full(e):
        return Failure(DISK_FULL, unit.group, "results directory full", unit=unit.index)
    return Failure(UNIT_ERROR, unit.group, message, unit=unit.index)
