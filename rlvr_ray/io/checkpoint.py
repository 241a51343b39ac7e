"""Checkpoint references and lazy, validated safetensors reads: one tensor at a time.

A reference is an HF-layout directory (``config.json`` + ``*.safetensors``, optionally sharded
with ``model.safetensors.index.json``), a single ``.safetensors`` file, or ``scheme://...`` for a
checkpoint source of :mod:`rlvr_ray.io.sources` (``hf://`` on the Hub, ``s3://`` in object
storage). The source lists the files and reads byte ranges; everything else happens here, the
same way for every source: only headers are read up front, parsed and checked by our own code
(``rlvr_ray.io.files``) so that every defect gets a one-line error naming the checkpoint, the
file and the tensor. Pickle checkpoints are refused without being opened.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlvr_ray.io.files import (
    DTYPES,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    CheckpointError,
    TensorEntry,
    fail,
    header_entries,
    parse_header,
    read_header,
)
from rlvr_ray.io.sources import INDEX_NAME, Listing, Reader, open_source

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
    "TensorEntry",
    "fingerprint_files",
    "open_checkpoint",
    "read_header",
]

_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 4096


def torch_dtype(code: str) -> tuple[torch.dtype, int] | None:
    """The torch dtype a stored safetensors dtype reads as, and its size in bytes (None for a
    sub-byte dtype or one this torch lacks). Imports torch."""
    import torch

    bits, torch_name = DTYPES[code]
    dtype = getattr(torch, torch_name or "", None)
    return (dtype, bits // 8) if bits % 8 == 0 and isinstance(dtype, torch.dtype) else None


@dataclass
class Checkpoint:
    """A lazily read checkpoint: tensor entries from headers, bytes read on demand through its
    source's reader (local files, Hub resolve URLs, object storage)."""

    ref: str
    path: Path  # where it is: a local path, or the remote reference itself
    entries: dict[str, TensorEntry]
    config: dict | None
    fingerprint: str
    files: list[Path] = field(default_factory=list)
    reader: Reader | None = field(default=None, repr=False, compare=False)
    pinned: str = ""  # the reference that reopens exactly these bytes ("" -> ``ref``)

    @property
    def n_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(
        self, name: str, device: str | torch.device = "cpu", buf: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read one tensor in its stored dtype into ``buf`` (a uint8 CPU tensor of at least its
        size, reused to spare page faults) or a fresh buffer; then move it to ``device``."""
        e = self.entries[name]
        rows = e.shape[0] if len(e.shape) >= 2 else 1
        return self.read_rows(name, 0, rows, device, buf)

    def read_rows(
        self,
        name: str,
        a: int,
        b: int,
        device: str | torch.device = "cpu",
        buf: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows [a, b) of a tensor's first dimension, shape [b - a, *shape[1:]] (a 0-d or 1-D
        tensor counts as one row: the whole of it). Read through the source's reader: safe
        from any thread."""
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
        the end of a truncated file). Safe from any thread."""
        return self.reader.pread(e.file, e.start + offset, view, e.end)

    def read_exact(self, e: TensorEntry, offset: int, view: memoryview) -> None:
        """``pread``, or a one-line error naming the file and tensor if the file ends early."""
        file = Path(e.file).name
        try:
            got = self.pread(e, offset, view)
        except CheckpointError as err:  # the reader names the checkpoint and file: add the tensor
            fail(self.ref, str(err).split(f", file {file}: ", 1)[-1], file, e.name)
        if got != len(view):
            fail(self.ref, f"short read ({got} of {len(view)} bytes)", file, e.name)

    def readinto(self, e: TensorEntry, offset: int, view: memoryview) -> None:
        """Fill the writable buffer ``view`` with tensor ``e``'s bytes from ``offset`` on (a
        one-line error if they are not all there)."""
        self.read_exact(e, offset, view)

    def will_need(self, name: str) -> bool:
        """Ask for a tensor's bytes to be read ahead (returns at once): local files have the
        kernel read them into the page cache unless they are there already; a remote reader
        may do nothing -> whether it asked."""
        e = self.entries[name]
        return bool(e.nbytes) and self.reader.will_need(e.file, e.start, e.nbytes)

    def close(self) -> None:
        """Close the files or connections kept open for reading (they reopen on the next read)."""
        if getattr(self, "reader", None) is not None:
            self.reader.close()


def fingerprint_files(
    files: list,
    headers: list[bytes],
    ckpt: str = "",
    reader: Reader | None = None,
    sizes: dict | None = None,
) -> str:
    """sha256 over each file's name, size, header and 64 sampled 4 KiB data blocks.

    Headers alone would collide (a run and its base share names, shapes and offsets); the
    samples make a collision need identical bytes at 64 spread-out places of every file.
    ``files`` are local paths, or names that ``reader`` reads (their ``sizes`` given).
    """
    if reader is None:
        from rlvr_ray.io.sources.local import LocalReader, _size

        reader = LocalReader(ckpt)
        sizes = {str(f): _size(Path(f), ckpt or str(f)) for f in files}
    h = hashlib.sha256()
    for path, raw in zip(files, headers, strict=True):
        size = sizes[str(path)]
        h.update(f"{Path(path).name}\0{size}\0".encode())
        h.update(raw)
        start = 8 + len(raw)
        span = max(size - start - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLE_BLOCKS):
            at = start + span * i // max(_SAMPLE_BLOCKS - 1, 1)
            block = bytearray(min(_SAMPLE_BYTES, max(size - at, 0)))
            got = reader.pread(str(path), at, memoryview(block))
            h.update(block[:got])
    return "sha256:" + h.hexdigest()[:32]


def open_checkpoint(ref: str, fingerprint: bool = True) -> Checkpoint:
    """Open ``ref`` through its source, read and check every header; no tensor data is read
    (but samples, for the fingerprint of a source that has no commit of its own).

    ``fingerprint=False`` skips the sampled content hash (workers re-opening a planned ref).
    Any defect of the checkpoint's files raises CheckpointError (one line), nothing else.
    """
    try:
        listing = open_source(ref)
        return _open_listing(ref, listing, fingerprint)
    except OSError as err:  # anything the checks above did not foresee (the files changed)
        where = Path(err.filename).name if err.filename else None
        fail(ref, f"cannot read ({err.strerror or err})", where)


def _open_listing(ref: str, listing: Listing, fingerprint: bool) -> Checkpoint:
    reader = listing.reader
    entries: dict[str, TensorEntry] = {}
    raws = []
    try:
        for f in listing.files:
            header, offset, raw, size = parse_header(
                lambda n, at, f=f: _read_bytes(reader, f, n, at),
                listing.sizes[f],
                Path(f).name,
                ref,
            )
            raws.append(raw)
            for name, e in header_entries(Path(f), ref, header, offset, size).items():
                if name in entries:
                    fail(ref, f"tensor also in {Path(entries[name].file).name}", Path(f).name, name)
                entries[name] = e
        for name, file in (listing.weight_map or {}).items():
            if name not in entries or entries[name].file != str(Path(file)):
                shard = Path(file).name
                fail(ref, f"index places tensor in {shard} but it is not there", shard, name)
        fp = listing.fingerprint
        if fp is None:
            fp = (
                fingerprint_files(listing.files, raws, ref, reader, listing.sizes)
                if fingerprint
                else ""
            )
    finally:
        reader.close()  # a sweep opens many checkpoints: keep nothing open until they are read
    files = [Path(f) for f in listing.files]
    return Checkpoint(
        ref, Path(listing.root), entries, listing.config, fp, files, reader, listing.pinned
    )


def _read_bytes(reader: Reader, file: str, n: int, offset: int) -> bytes:
    buf = bytearray(n)
    got = reader.pread(file, offset, memoryview(buf))
    return bytes(buf[:got])
