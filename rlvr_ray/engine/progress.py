"""Live progress of a scan: tensors done / total, GB scanned, GB/s, ETA.

On a terminal it redraws one line; elsewhere it is quiet unless ``mode='log'`` (Ray jobs, where
``ray job logs --follow`` shows a line every ``every`` seconds).
"""

from __future__ import annotations

import sys
import time


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total_tensors: int, total_bytes: int, mode: str | None = None,
                 every: float = 10.0, stream=None):  # fmt: skip
        self.stream = stream or sys.stderr
        if mode is None:
            mode = "tty" if getattr(self.stream, "isatty", lambda: False)() else "quiet"
        self.mode, self.every = mode, every
        self.total_t, self.total_b = total_tensors, total_bytes
        self.done_t = self.done_b = 0
        self.t0 = self.last = time.perf_counter()

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done_b / dt
        left = (self.total_b - self.done_b) / rate if rate > 0 else float("nan")
        eta = _dur(left) if left == left else "?"
        return (f"tensors {self.done_t}/{self.total_t}  {self.done_b / 1e9:.2f}/"
                f"{self.total_b / 1e9:.2f} GB  {rate / 1e9:.2f} GB/s  ETA {eta}")  # fmt: skip

    def update(self, tensors: int, nbytes: int) -> None:
        self.done_t += tensors
        self.done_b += nbytes
        now = time.perf_counter()
        if self.mode == "tty":
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
        elif self.mode == "log" and (now - self.last >= self.every or self.done_t == self.total_t):
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last = now

    def close(self) -> None:
        if self.mode == "tty":
            self.stream.write("\n")
            self.stream.flush()
