"""Byte-range reads of remote files: split, parallel, retried, resumed, size-checked.

A remote reader subclasses :class:`RangeReader` and says how to send one ranged GET
(:meth:`RangeReader.fetch`); this module turns a read of any size into requests of at most
``PIECE_BYTES`` run side by side, retries what fails for a transient reason (a response cut
mid-body resumes from the byte where it stopped, not from its start), and checks each answer:
the file's total size must be the listed one, its ETag must not change during the scan, and a
read of a whole file is hashed against the sha256 its source gives, where there is one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rlvr_ray.io.files import fail

PIECE_BYTES = 8 * 1024 * 1024  # one request's share of a large read
READ_AHEAD_BYTES = 32 * 1024 * 1024  # read ahead of a tensor read in small windows
MAX_STREAMS = 16  # tensors read ahead at once per reader
PARALLEL = 8  # requests in flight per reader
ATTEMPTS = 5  # per piece, counting the first
BACKOFF_S = 0.2  # the first retry's wait, doubled for each next one


class Permanent(Exception):
    """A request failed for a reason that a retry cannot fix (missing file, refused access)."""


@dataclass
class Answer:
    """One ranged response: its body (chunks), the file's total size and its ETag if any."""

    body: Iterator[bytes]
    total: int | None
    etag: str | None = None


class _Block:
    """Bytes [start, end) of a file, being read ahead by the pool (``futures``)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.buf = bytearray(end - start)
        self.futures: list = []

    def wait(self) -> None:
        for f in list(self.futures):
            f.result()  # a failed read raises its one-line error here


class RangeReader:
    """The :class:`~rlvr_ray.io.sources.Reader` of remote files ``sizes`` (name -> bytes)."""

    def __init__(self, ref: str, sizes: dict[str, int], sha256: dict[str, str] | None = None):
        self.ref, self.sizes, self.sha256 = ref, dict(sizes), dict(sha256 or {})
        self._etags: dict[str, str] = {}
        self._ahead: dict[tuple[str, int], list[_Block]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- to implement -----------------------------------------------------------------------

    def fetch(self, file: str, start: int, end: int) -> Answer:
        """Send a GET of bytes [start, end) of ``file``; raise :class:`Permanent` or any other
        exception (transient)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop connections (they reopen on the next request)."""

    # -- the Reader interface ---------------------------------------------------------------

    def pread(self, file: str, offset: int, view: memoryview, limit: int | None = None) -> int:
        """Fill ``view`` from byte ``offset`` of ``file`` -> bytes read. ``limit``: where the
        caller's data (a tensor) ends; small reads then read ahead, up to it, in the background
        (a tensor read window after window costs a few large requests, not one per window)."""
        size = self.sizes.get(file)
        if size is None:
            fail(self.ref, "not a file of this checkpoint", file)
        n = max(min(len(view), size - offset), 0)
        limit = min(limit, size) if limit is not None else None
        if limit is not None and 0 < n < READ_AHEAD_BYTES and offset + n <= limit:
            if not self._from_ahead(file, offset, view[:n], limit):
                self._read(file, offset, view[:n])
            if offset + n < limit:
                self._read_ahead(file, offset + n, limit)
            return n
        self._read(file, offset, view[:n])
        if n and offset == 0 and n == size and file in self.sha256:
            digest = hashlib.sha256(view[:n]).hexdigest()
            if digest != self.sha256[file]:
                fail(
                    self.ref,
                    f"sha256 {digest[:12]}... is not the listed {self.sha256[file][:12]}...",
                    file,
                )
        return n

    def _read(self, file: str, offset: int, view: memoryview) -> None:
        """Bytes [offset, offset + len(view)) of ``file``, in pieces side by side."""
        n = len(view)
        pieces = [(a, min(a + PIECE_BYTES, n)) for a in range(0, n, PIECE_BYTES)]
        if len(pieces) == 1:
            self._fill(file, offset, view)
        elif pieces:
            list(
                self._executor().map(
                    lambda p: self._fill(file, offset + p[0], view[p[0] : p[1]]), pieces
                )
            )

    def _from_ahead(self, file: str, offset: int, view: memoryview, limit: int) -> bool:
        """Copy [offset, offset + len(view)) from blocks read ahead for (file, limit), if they
        hold all of it (waiting for them) -> whether they did; consumed blocks are dropped."""
        end = offset + len(view)
        with self._lock:
            blocks = list(self._ahead.get((file, limit), ()))
        got, parts = offset, []
        for block in blocks:
            if block.start <= got < block.end:
                take = min(block.end, end) - got
                parts.append((block, got, take))
                got += take
            if got == end:
                break
        if got != end:
            with self._lock:
                self._ahead.pop((file, limit), None)  # not sequential: start again from here
            return False
        at = 0
        for block, pos, take in parts:
            try:
                block.wait()
            except Exception:  # read it again, with retries of its own, and no stale block
                with self._lock:
                    self._ahead.pop((file, limit), None)
                return False
            view[at : at + take] = block.buf[pos - block.start : pos - block.start + take]
            at += take
        with self._lock:
            kept = [b for b in self._ahead.get((file, limit), ()) if b.end > end]
            self._ahead[(file, limit)] = kept
        return True

    def _read_ahead(self, file: str, pos: int, limit: int) -> None:
        """Keep up to READ_AHEAD_BYTES beyond ``pos`` of (file, limit) being read."""
        key, pool = (file, limit), self._executor()
        with self._lock:  # a block is listed only once its reads are under way
            blocks = self._ahead.setdefault(key, [])
            last = blocks[-1].end if blocks else pos
            if last >= limit or last - pos >= READ_AHEAD_BYTES // 2:
                return
            block = _Block(last, min(last + READ_AHEAD_BYTES, limit))
            n, view = block.end - block.start, memoryview(block.buf)
            block.futures = [
                pool.submit(self._fill, file, block.start + a, view[a : min(a + PIECE_BYTES, n)])
                for a in range(0, n, PIECE_BYTES)
            ]
            blocks.append(block)
            while len(self._ahead) > MAX_STREAMS:  # streams left unfinished: forget the oldest
                self._ahead.pop(next(iter(self._ahead)))

    def will_need(self, file: str, offset: int, nbytes: int) -> bool:
        return False  # reads are fetched when asked; nothing to warm

    def descriptor(self, file: str) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._ahead = {}
        if pool is not None:
            pool.shutdown(wait=False)
        self.release()

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_lock")}
        return state | {"_pool": None, "_etags": {}, "_ahead": {}}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- internals --------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="rlvr-range")
            return self._pool

    def _fill(self, file: str, start: int, view: memoryview) -> None:
        """Bytes [start, start + len(view)) of ``file`` into ``view``, resumed where cut."""
        got, failures, n = 0, 0, len(view)
        while got < n:
            try:
                answer = self.fetch(file, start + got, start + n)
                self._check(file, answer)
                for chunk in answer.body:
                    k = min(len(chunk), n - got)
                    view[got : got + k] = chunk[:k]
                    got += k
                    if got == n:
                        break
                if got < n:
                    raise ConnectionError(f"response ended after {got} of {n} bytes")
            except Permanent as e:
                fail(self.ref, str(e), file)
            except Exception as e:  # network, 5xx, a cut body: retried from byte ``got``
                failures += 1
                if failures >= ATTEMPTS:
                    why = " ".join(str(e).split()) or type(e).__name__
                    fail(self.ref, f"read failed after {ATTEMPTS} attempts ({why})", file)
                time.sleep(BACKOFF_S * 2 ** (failures - 1))

    def _check(self, file: str, answer: Answer) -> None:
        size = self.sizes[file]
        if answer.total is not None and answer.total != size:
            raise Permanent(f"file is {answer.total} bytes, listed as {size}: it changed")
        if answer.etag:
            seen = self._etags.setdefault(file, answer.etag)
            if seen != answer.etag:
                raise Permanent(f"file changed during the scan (ETag {seen} -> {answer.etag})")
