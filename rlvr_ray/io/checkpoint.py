"""Checkpoint references and lazy, validated safetensors reads: one tensor at a time.

A reference is an HF-layout directory (``config.json`` + ``*.safetensors``, optionally sharded
with ``model.safetensors.index.json``), a single ``.safetensors`` file, or ``scheme://...`` for a
registered scheme (``hf://`` comes from ``rlvr_ray.hub``). Only headers are read up front; the
header is parsed and checked by our own code (``rlvr_ray.io.files``) so that every defect gets a
one-line error naming the checkpoint, the file and the tensor. Pickle checkpoints are refused
without being opened.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlvr_ray.io.files import (
    DTYPES,
    FILE_KINDS,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    CheckpointError,
    TensorEntry,
    fail,
    header_entries,
    open_regular,
    read_header,
    read_json,
)

if TYPE_CHECKING:  # torch is imported where tensors are built: reading headers needs none
    import torch

__all__ = [
    "DTYPES",
    "torch_dtype",
    "FLOAT_DTYPES",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "Checkpoint",
    "CheckpointError",
    "ResolvedRef",
    "TensorEntry",
    "fingerprint_files",
    "open_checkpoint",
    "read_header",
    "register_scheme",
    "resolve",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 4096


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
            fail(ref, f"unknown reference scheme {scheme!r} (known: {sorted(_SCHEMES)})")
        return _SCHEMES[scheme](ref)
    return ResolvedRef(Path(ref).expanduser())


def torch_dtype(code: str) -> tuple[torch.dtype, int] | None:
    """The torch dtype a stored safetensors dtype reads as, and its size in bytes (None for a
    sub-byte dtype or one this torch lacks). Imports torch."""
    import torch

    bits, torch_name = DTYPES[code]
    dtype = getattr(torch, torch_name or "", None)
    return (dtype, bits // 8) if bits % 8 == 0 and isinstance(dtype, torch.dtype) else None


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
        import torch

        e = self.entries[name]
        if (kind := torch_dtype(e.dtype)) is None:
            fail(
                self.ref,
                f"dtype {e.dtype} cannot be read as a tensor here",
                Path(e.file).name,
                name,
            )
        dtype, size = kind
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
            fail(self.ref, f"read failed ({err.strerror})", Path(e.file).name, e.name)
        return got

    def read_exact(self, e: TensorEntry, offset: int, view: memoryview) -> None:
        """``pread``, or a one-line error naming the file and tensor if the file ends early."""
        if (got := self.pread(e, offset, view)) != len(view):
            fail(self.ref, f"short read ({got} of {len(view)} bytes)", Path(e.file).name, e.name)

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

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd, _ = open_regular(Path(file), self.ref)
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
        fail(ckpt, f"pickle checkpoint ({', '.join(sorted(pickles))}) refused: rlvr-ray never "
                    "unpickles; convert it to safetensors")  # fmt: skip


def _shard_files(ckpt: str, root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """-> (the directory's safetensors files, the index's tensor -> shard map if it has one)."""
    index = root / INDEX_NAME
    if os.path.lexists(index):
        weight_map = read_json(index, ckpt, "malformed index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and not Path(v).is_absolute() and ".." not in Path(v).parts
            for v in weight_map.values()
        ):
            fail(
                ckpt,
                "malformed index (weight_map must map tensors to shard file names)",
                INDEX_NAME,
            )
        files = []
        for shard in sorted(set(weight_map.values())):
            if not os.path.lexists(root / shard):
                names = sorted(k for k, v in weight_map.items() if v == shard)
                fail(ckpt, f"index names missing shard {shard}", INDEX_NAME, names[0])
            files.append(root / shard)
        return files, weight_map
    try:
        names = sorted(os.listdir(root))
    except OSError as err:
        fail(ckpt, f"cannot list ({err.strerror})", root.name)
    files = [root / n for n in names if n.endswith(".safetensors")]
    if not files:
        _refuse_pickles(ckpt, [root / n for n in names])
        fail(ckpt, f"no *.safetensors files in {root} (empty checkpoint)")
    return files, None


def fingerprint_files(files: list[Path], headers: list[bytes], ckpt: str = "") -> str:
    """sha256 over each file's name, size, header and 64 sampled 4 KiB data blocks.

    Headers alone would collide (a run and its base share names, shapes and offsets); the
    samples make a collision need identical bytes at 64 spread-out places of every file.
    """
    h = hashlib.sha256()
    for path, raw in zip(files, headers, strict=True):
        fd, size = open_regular(path, ckpt or str(path))
        try:
            h.update(f"{path.name}\0{size}\0".encode())
            h.update(raw)
            start = 8 + len(raw)
            span = max(size - start - _SAMPLE_BYTES, 0)
            for i in range(_SAMPLE_BLOCKS):
                at = start + span * i // max(_SAMPLE_BLOCKS - 1, 1)
                h.update(os.pread(fd, _SAMPLE_BYTES, at))
        finally:
            os.close(fd)
    return "sha256:" + h.hexdigest()[:32]


def open_checkpoint(ref: str, fingerprint: bool = True) -> Checkpoint:
    """Resolve ``ref``, read and check every header; no tensor data is read (but samples).

    ``fingerprint=False`` skips the sampled content hash (workers re-opening a planned ref).
    Any defect of the checkpoint's files raises CheckpointError (one line), nothing else.
    """
    resolved = resolve(ref)
    try:
        return _open_local(ref, resolved, fingerprint)
    except OSError as err:  # anything the checks above did not foresee (the files changed)
        where = Path(err.filename).name if err.filename else None
        fail(ref, f"cannot read ({err.strerror or err})", where)


def _open_local(ref: str, resolved: ResolvedRef, fingerprint: bool) -> Checkpoint:
    root = resolved.path
    try:
        mode = os.stat(root).st_mode
    except OSError as err:
        if isinstance(err, (FileNotFoundError, NotADirectoryError)):
            fail(ref, f"path {root} does not exist")
        fail(ref, f"cannot open ({err.strerror})", root.name)
    weight_map = None
    if stat.S_ISREG(mode):
        _refuse_pickles(ref, [root])
        if root.suffix != ".safetensors":
            fail(ref, "not a .safetensors file or HF directory", root.name)
        files, cfg_path = [root], root.parent / "config.json"
    elif stat.S_ISDIR(mode):
        files, weight_map = _shard_files(ref, root)
        cfg_path = root / "config.json"
    else:
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a file")
        fail(ref, f"not a .safetensors file or HF directory ({kind})", root.name)
    config = None
    if os.path.lexists(cfg_path):
        config = read_json(cfg_path, ref, "malformed config.json")
    entries: dict[str, TensorEntry] = {}
    raws = []
    for f in files:
        header, offset, raw, size = read_header(f, ref)
        raws.append(raw)
        for name, e in header_entries(f, ref, header, offset, size).items():
            if name in entries:
                fail(ref, f"tensor also in {Path(entries[name].file).name}", f.name, name)
            entries[name] = e
    for name, shard in (weight_map or {}).items():
        if name not in entries or Path(entries[name].file) != root / shard:
            fail(ref, f"index places tensor in {shard} but it is not there", shard, name)
    fp = resolved.fingerprint or (fingerprint_files(files, raws, ref) if fingerprint else "")
    return Checkpoint(ref, root, entries, config, fp, files)
