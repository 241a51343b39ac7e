"""Live progress of a scan: tensors done / total, GB scanned, GB/s, ETA.

On a terminal it redraws one line; elsewhere (a notebook, a log file, a Ray job, where ``ray job
logs --follow`` shows it) it prints a line every ``every`` seconds, and a last one at the end of
a scan that printed any: a scan shorter than ``every`` stays quiet, unless ``mode='log'`` was
asked for (``--progress log``, as the Ray job script does): then the last line always prints.
"""

from __future__ import annotations

import sys
import time


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _unit(n: float) -> tuple[float, str]:
    """The decimal unit a byte count reads best in -> (its size in bytes, its name)."""
    return next(((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if n >= s), (1, "B"))


def size_text(n: float) -> str:
    """A byte count in the unit it reads best in: 3.02 GB, 12.50 MB, 512 B."""
    scale, unit = _unit(n)
    return f"{n / scale:.2f} {unit}" if scale > 1 else f"{int(n)} B"


class Progress:
    def __init__(
        self,
        total_tensors: int,
        total_bytes: int,
        mode: str | None = None,
        every: float = 10.0,
        stream=None,
    ):
        self.stream = stream or sys.stderr
        # whether the scan's end gets a log line: always when log mode was asked for; by
        # default (off a terminal) once a line was printed, so a scan shorter than ``every``
        # stays quiet
        self.end_line = mode == "log"
        if mode is None:
            mode = "tty" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.every = mode, every
        self.total_t, self.total_b = total_tensors, total_bytes
        self.done_t = self.done_b = 0
        self.t0 = self.last = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, bytes done) at the first report

    def line(self) -> str:
        now = time.perf_counter()
        rate = self.done_b / max(now - self.t0, 1e-9)
        # the ETA extrapolates from the first report on: the time before it is start-up (Ray,
        # actors importing torch), not throughput, and would make a scan of seconds say minutes
        eta = "?"
        if self.first is not None and self.done_b > self.first[1] and now > self.first[0]:
            pace = (self.done_b - self.first[1]) / (now - self.first[0])
            eta = _dur((self.total_b - self.done_b) / pace)
        scale, unit = _unit(self.total_b)
        return (
            f"tensors {self.done_t}/{self.total_t}  {self.done_b / scale:.2f}/"
            f"{self.total_b / scale:.2f} {unit}  {size_text(rate)}/s  ETA {eta}"
        )

    def update(self, tensors: int, nbytes: int) -> None:
        self.done_t += tensors
        self.done_b += nbytes
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.done_b)
        if self.mode == "tty":
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
        elif self.mode == "log" and (
            now - self.last >= self.every or (self.end_line and self.done_t == self.total_t)
        ):
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last, self.end_line = now, True

    def close(self) -> None:
        if self.mode == "tty":
            self.stream.write("\n")
            self.stream.flush()
