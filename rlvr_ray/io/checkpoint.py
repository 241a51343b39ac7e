"""Checkpoint references and lazy, validated safetensors reads: one tensor at a time.

A reference is an HF-layout directory (``config.json`` + ``*.safetensors``, optionally sharded
with ``model.safetensors.index.json``), a single ``.safetensors`` file, or ``scheme://...`` for a
registered scheme (``hf://`` comes from ``rlvr_ray.hub``). Only headers are read up front; the
header is parsed and checked by our own code so that every defect gets a one-line error naming
the checkpoint, the file and the tensor. Pickle checkpoints are refused without being opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2), "F32": (torch.float32, 4),
    "F64": (torch.float64, 8), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "I16": (torch.int16, 2), "I32": (torch.int32, 4), "I64": (torch.int64, 8),
    "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}  # fmt: skip
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 4096


class CheckpointError(Exception):
    """A checkpoint cannot be read; the message is one line naming checkpoint, file, tensor."""


def _fail(ckpt: str, msg: str, file: str | None = None, tensor: str | None = None):
    where = f"checkpoint {ckpt}"
    if file:
        where += f", file {file}"
    if tensor:
        where += f", tensor {tensor}"
    raise CheckpointError(f"{where}: {msg}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place on disk: absolute byte range [start, end) of ``file``."""

    name: str
    file: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ResolvedRef:
    """What a scheme resolver returns: a local path and, if it knows one, a fingerprint."""

    path: Path
    fingerprint: str | None = None


_SCHEMES: dict[str, Callable[[str], ResolvedRef]] = {}


def register_scheme(scheme: str, resolver: Callable[[str], ResolvedRef]) -> None:
    """Make ``scheme://...`` references resolvable (e.g. ``hf`` by rlvr_ray.hub)."""
    _SCHEMES[scheme] = resolver


def resolve(ref: str) -> ResolvedRef:
    if "://" in ref:
        scheme = ref.split("://", 1)[0]
        if scheme not in _SCHEMES and scheme == "hf":
            import rlvr_ray.hub  # noqa: F401  (registers the hf scheme)
        if scheme not in _SCHEMES:
            _fail(ref, f"unknown reference scheme {scheme!r} (known: {sorted(_SCHEMES)})")
        return _SCHEMES[scheme](ref)
    return ResolvedRef(Path(ref).expanduser())


def read_header(path: Path, ckpt: str) -> tuple[dict, int, bytes]:
    """Parse and check a safetensors header -> (entries json, data offset, raw header bytes)."""
    name = path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(ckpt, f"truncated: {size} bytes, shorter than the 8-byte header length", name)
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
            _fail(
                ckpt, "a pickle/zip torch file named .safetensors; refused, never unpickled", name
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            _fail(ckpt, f"oversized header: {n} bytes > {MAX_HEADER_BYTES} limit", name)
        if 8 + n > size:
            _fail(ckpt, f"truncated: header of {n} bytes but file is {size} bytes", name)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(ckpt, f"corrupt header (not JSON: {e})", name)
    if not isinstance(header, dict):
        _fail(ckpt, "corrupt header (not a JSON object)", name)
    return header, 8 + n, raw


def _entries(path: Path, ckpt: str, header: dict, offset: int) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    out: dict[str, TensorEntry] = {}
    for tname, e in header.items():
        if tname == "__metadata__":
            continue
        try:
            dtype, shape, (s, t) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            _fail(ckpt, "corrupt header entry (needs dtype, shape, data_offsets)", path.name, tname)
        if dtype not in DTYPES:
            _fail(ckpt, f"unsupported dtype {dtype}", path.name, tname)
        if any(d < 0 for d in shape) or not 0 <= s <= t:
            _fail(ckpt, f"corrupt header entry (shape {shape}, offsets {s}..{t})", path.name, tname)
        if t - s != math.prod(shape) * DTYPES[dtype][1]:
            _fail(ckpt, f"corrupt header: {t - s} bytes for {dtype}{list(shape)}", path.name, tname)
        if offset + t > size:
            _fail(ckpt, f"truncated: data ends at byte {offset + t}, file has {size}", path.name, tname)  # fmt: skip
        out[tname] = TensorEntry(tname, str(path), dtype, shape, offset + s, offset + t)
    return out


@dataclass
class Checkpoint:
    """A lazily read checkpoint: tensor entries from headers, bytes read on demand."""

    ref: str
    path: Path
    entries: dict[str, TensorEntry]
    config: dict | None
    fingerprint: str
    files: list[Path] = field(default_factory=list)
    _fds: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str, device: str | torch.device = "cpu",
             buf: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Read one tensor in its stored dtype into ``buf`` (a uint8 CPU tensor of at least its
        size, reused to spare page faults) or a fresh buffer; then move it to ``device``."""
        e = self.entries[name]
        rows = e.shape[0] if len(e.shape) >= 2 else 1
        return self.read_rows(name, 0, rows, device, buf)

    def read_rows(self, name: str, a: int, b: int, device: str | torch.device = "cpu",
                  buf: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Rows [a, b) of a tensor's first dimension, shape [b - a, *shape[1:]] (a 0-d or 1-D
        tensor counts as one row: the whole of it). Positional reads on a descriptor kept open
        per file: safe from any thread."""
        e = self.entries[name]
        dtype, size = DTYPES[e.dtype]
        shape = e.shape if len(e.shape) >= 2 else (1, *e.shape)
        row_bytes = math.prod(shape[1:]) * size
        nbytes = (b - a) * row_bytes
        pin = torch.device(device).type == "cuda"
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        buf = buf[:nbytes]
        if nbytes:
            self.read_exact(e, a * row_bytes, memoryview(buf.numpy()))
        t = buf.view(dtype).reshape((b - a, *shape[1:]) if len(e.shape) >= 2 else e.shape)
        return t.to(device, non_blocking=pin) if pin else t

    def pread(self, e: TensorEntry, offset: int, view: memoryview) -> int:
        """Fill ``view`` from byte ``offset`` of tensor ``e``'s data -> bytes read (short at
        the end of a truncated file)."""
        fd, got, n = self._fd(e.file), 0, len(view)
        try:
            while got < n and (k := os.preadv(fd, [view[got:]], e.start + offset + got)):
                got += k
        except OSError as err:
            _fail(self.ref, f"read failed ({err.strerror})", Path(e.file).name, e.name)
        return got

    def read_exact(self, e: TensorEntry, offset: int, view: memoryview) -> None:
        """``pread``, or a one-line error naming the file and tensor if the file ends early."""
        if (got := self.pread(e, offset, view)) != len(view):
            _fail(self.ref, f"short read ({got} of {len(view)} bytes)", Path(e.file).name, e.name)

    def will_need(self, name: str) -> bool:
        """Ask the kernel to start reading a tensor's bytes into the page cache (returns at
        once; a scan of files on disk then finds them there) unless its first and last bytes
        are there already -> whether it asked."""
        e = self.entries[name]
        if not e.nbytes:
            return False
        fd = self._fd(e.file)
        if _resident(fd, e.start) and _resident(fd, e.end - 1):
            return False  # a warm page cache: advising costs a walk over every page
        os.posix_fadvise(fd, e.start, e.nbytes, os.POSIX_FADV_WILLNEED)
        return True

    def locate(self, name: str) -> tuple[int, int]:
        """-> (an open descriptor of the file holding tensor ``name``, where its data starts):
        for callers that read it themselves, by positional reads (any thread)."""
        e = self.entries[name]
        return self._fd(e.file), e.start

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                _fail(self.ref, f"cannot open ({err.strerror})", Path(file).name)
            if (kept := self._fds.setdefault(file, fd)) != fd:  # another thread was first
                os.close(fd)
                fd = kept
        return fd

    def close(self) -> None:
        """Close the files kept open for reading (they reopen on the next read)."""
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        self.close()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fds"} | {"_fds": {}}


def _resident(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` is in the page cache (a read that may not wait)."""
    try:
        return os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
    except (OSError, AttributeError):  # not in memory (EAGAIN), or no RWF_NOWAIT here
        return False


def _refuse_pickles(ckpt: str, paths: list[Path]) -> None:
    pickles = [p.name for p in paths if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        _fail(ckpt, f"pickle checkpoint ({', '.join(sorted(pickles))}) refused: rlvr-ray never "
                    "unpickles; convert it to safetensors")  # fmt: skip


def _shard_files(ckpt: str, root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            _fail(ckpt, f"malformed index ({e})", INDEX_NAME)
        files = []
        for shard in sorted(set(weight_map.values())):
            if not (root / shard).is_file():
                names = sorted(k for k, v in weight_map.items() if v == shard)
                _fail(ckpt, f"index names missing shard {shard}", INDEX_NAME, names[0])
            files.append(root / shard)
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        _refuse_pickles(ckpt, sorted(root.iterdir()))
        _fail(ckpt, f"no *.safetensors files in {root} (empty checkpoint)")
    return files


def fingerprint_files(files: list[Path], headers: list[bytes]) -> str:
    """sha256 over each file's name, size, header and 64 sampled 4 KiB data blocks.

    Headers alone would collide (a run and its base share names, shapes and offsets); the
    samples make a collision need identical bytes at 64 spread-out places of every file.
    """
    h = hashlib.sha256()
    for path, raw in zip(files, headers, strict=True):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        h.update(raw)
        start = 8 + len(raw)
        span = max(size - start - _SAMPLE_BYTES, 0)
        with open(path, "rb") as f:
            for i in range(_SAMPLE_BLOCKS):
                f.seek(start + span * i // max(_SAMPLE_BLOCKS - 1, 1))
                h.update(f.read(_SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()[:32]


def open_checkpoint(ref: str, fingerprint: bool = True) -> Checkpoint:
    """Resolve ``ref``, read and check every header; no tensor data is read (but samples).

    ``fingerprint=False`` skips the sampled content hash (workers re-opening a planned ref).
    """
    resolved = resolve(ref)
    root = resolved.path
    if not root.exists():
        _fail(ref, f"path {root} does not exist")
    if root.is_file():
        _refuse_pickles(ref, [root])
        if root.suffix != ".safetensors":
            _fail(ref, "not a .safetensors file or HF directory", root.name)
        files, cfg_path = [root], root.parent / "config.json"
    else:
        files, cfg_path = _shard_files(ref, root), root / "config.json"
    config = None
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            _fail(ref, f"malformed config.json ({e})", "config.json")
    entries: dict[str, TensorEntry] = {}
    raws = []
    for f in files:
        header, offset, raw = read_header(f, ref)
        raws.append(raw)
        for name, e in _entries(f, ref, header, offset).items():
            if name in entries:
                _fail(ref, f"tensor also in {Path(entries[name].file).name}", f.name, name)
            entries[name] = e
    index = root / INDEX_NAME if root.is_dir() else None
    if index is not None and index.exists():
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            if name not in entries or Path(entries[name].file).name != shard:
                _fail(ref, f"index places tensor in {shard} but it is not there", shard, name)
    fp = resolved.fingerprint or (fingerprint_files(files, raws) if fingerprint else "")
    return Checkpoint(ref, root, entries, config, fp, files)
