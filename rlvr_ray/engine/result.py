"""A scan's outcome: what ran, what was resumed, what failed and why (``ScanResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlvr_ray.engine import failures
from rlvr_ray.engine.failures import Failure


@dataclass
class ScanResult:
    out: str
    scan_ids: list[str] = field(default_factory=list)
    n_units: int = 0
    n_units_resumed: int = 0
    n_tensors: int = 0
    n_bytes: int = 0
    seconds: float = 0.0
    unit_seconds: float = 0.0  # from the first unit handed to an actor to the last one back
    errors: list[str] = field(default_factory=list)  # checkpoints/units that were skipped
    skipped: list[str] = field(default_factory=list)  # tensors that could not be compared
    warnings: list[str] = field(default_factory=list)
    units: list[dict] = field(default_factory=list)  # unit reports (with node_id and pid)
    retried: list[str] = field(default_factory=list)  # units run again after a lost actor
    failures: list[Failure] = field(default_factory=list)  # errors, by kind / group / run / unit
    disk_full: bool = False  # writing results ran out of space: the scan stopped early
    interrupted: bool = False  # Ctrl-C (SIGINT): the scan stopped early
    executor: str = "ray"  # where the units ran: "ray" (actors) or "local" (threads, no Ray)

    @property
    def exit_code(self) -> int:
        """0: everything compared; 3: something was skipped (see errors / skipped) or the disk
        filled up; 130: interrupted."""
        if self.interrupted:
            return 130
        return 3 if self.errors or self.skipped or self.disk_full else 0

    @property
    def n_units_kept(self) -> int:
        """Units whose results are in the results directory (resumed ones included)."""
        return self.n_units_resumed + len(self.units)

    def __repr__(self) -> str:
        """One line (a notebook shows it): what was scanned and how it ended; the unit reports
        and messages are in the fields."""
        ended = " interrupted" if self.interrupted else " disk full" if self.disk_full else ""
        return (
            f"ScanResult(out={self.out!r}, exit_code={self.exit_code}{ended}, "
            f"units={self.n_units} ({self.n_units_resumed} already done), "
            f"tensors={self.n_tensors}, errors={len(self.errors)}, skipped={len(self.skipped)}, "
            f"warnings={len(self.warnings)}, executor={self.executor!r}, "
            f"seconds={self.seconds:.1f})"
        )

    def fail(self, failure: Failure) -> None:
        """Record a failure, and its line in ``errors`` (a full disk sets ``disk_full``)."""
        self.failures.append(failure)
        if failure.kind == failures.DISK_FULL:
            self.disk_full = True
        else:
            self.errors.append(f"group {failure.group}: {failure.line}")
