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
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are built: reading headers needs none
    import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's limit
MAX_JSON_BYTES = 100_000_000  # config.json and the index: read whole, so bounded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
#: every safetensors dtype -> (bits per element, torch dtype attribute or None): what the
#: header check needs is the size; a dtype the statistics cannot use is a per-tensor skip
DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "C64": (64, "complex64"),
    "F64": (64, "float64"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_USIZE_MAX = 2**64 - 1  # safetensors' dims, offsets and sizes are u64
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 4096
_JSON_SPACE = b" \t\r\n"
_EXTRA_DEPTH = 125  # nesting left to a tensor entry's extra keys under serde_json's limit


class CheckpointError(Exception):
    """A checkpoint cannot be read; the message is one line naming checkpoint, file, tensor."""


def _one_line(text: str) -> str:
    """``text`` with control characters escaped (a name may hold a newline)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(ckpt: str, msg: str, file: str | None = None, tensor: str | None = None):
    where = f"checkpoint {ckpt}"
    if file:
        where += f", file {file}"
    if tensor:
        where += f", tensor {tensor}"
    raise CheckpointError(_one_line(f"{where}: {msg}"))


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


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _open_regular(path: Path, ckpt: str) -> tuple[int, int]:
    """-> (a read-only descriptor, the size) of ``path`` if it is a regular file (never blocks:
    a FIFO is refused, not waited on); else a one-line error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        _fail(ckpt, f"cannot open ({err.strerror})", path.name)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        _fail(ckpt, f"not a regular file ({kind})", path.name)
    os.set_blocking(fd, True)  # O_NONBLOCK was for the open only
    return fd, st.st_size


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n and (part := os.pread(fd, n - got, offset + got)):
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class _Object(dict):
    """A parsed JSON object that remembers which of its keys were repeated."""

    repeated: frozenset = frozenset()


def _object(pairs: list[tuple]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        obj.repeated = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _parse_json(raw: bytes, ckpt: str, file: str, what: str):
    """Strict JSON, as serde_json reads it: UTF-8, no NaN/Infinity; a one-line error. Objects
    remember repeated keys (safetensors refuses a repeated field, not a repeated name)."""
    try:
        return json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_object
        )
    except UnicodeDecodeError:
        _fail(ckpt, f"{what} (not UTF-8)", file)
    except RecursionError:
        _fail(ckpt, f"{what} (nested too deeply)", file)
    except ValueError as e:  # JSONDecodeError, NaN/Infinity
        _fail(ckpt, f"{what} (not JSON: {e})", file)


def _read_json(path: Path, ckpt: str, what: str) -> dict:
    """A JSON object file (config.json, the index): regular, bounded, strict."""
    fd, size = _open_regular(path, ckpt)
    try:
        if size > MAX_JSON_BYTES:
            _fail(ckpt, f"{what} ({size} bytes > {MAX_JSON_BYTES} limit)", path.name)
        raw = _pread_all(fd, size, 0)
    finally:
        os.close(fd)
    data = _parse_json(raw, ckpt, path.name, what)
    if not isinstance(data, dict):
        _fail(ckpt, f"{what} (not a JSON object)", path.name)
    return data


def read_header(path: Path, ckpt: str) -> tuple[dict, int, bytes, int]:
    """Parse a safetensors header -> (entries json, data offset, raw header bytes, file size).

    The format is told by what the file is: a little-endian header length that fits the
    file followed by a JSON object is safetensors; pickle (0x80 + protocol 2..5) and zip
    (``PK\\x03\\x04``, torch.save) files are refused by their signatures; anything else is
    a corrupt header."""
    name = path.name
    fd, size = _open_regular(path, ckpt)
    try:
        head = _pread_all(fd, 8, 0)
        if len(head) < 8:
            _fail(ckpt, f"truncated: {size} bytes, shorter than the 8-byte header length", name)
        (n,) = struct.unpack("<Q", head)
        raw = _pread_all(fd, n, 8) if n <= MAX_HEADER_BYTES and 8 + n <= size else b""
    finally:
        os.close(fd)
    if raw.lstrip(_JSON_SPACE)[:1] != b"{":
        if head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5):
            _fail(
                ckpt, "a pickle/zip torch file named .safetensors; refused, never unpickled", name
            )
        if n > MAX_HEADER_BYTES:
            _fail(
                ckpt,
                f"corrupt header: oversized header of {n} bytes > {MAX_HEADER_BYTES} limit",
                name,
            )
        if 8 + n > size:
            _fail(ckpt, f"truncated: header of {n} bytes but file is {size} bytes", name)
        _fail(ckpt, "corrupt header (not a JSON object after the 8-byte length)", name)
    header = _parse_json(raw, ckpt, name, "corrupt header")
    if not isinstance(header, dict):
        _fail(ckpt, "corrupt header (not a JSON object)", name)
    if "__metadata__" in header.repeated:
        _fail(ckpt, "corrupt header (__metadata__ given twice)", name)
    if b"\\u" in raw:  # an escape may be a lone surrogate, which serde_json refuses
        meta = header.get("__metadata__")
        texts = [*header, *(meta.items() if isinstance(meta, dict) else ())]
        bad = next((t for t in texts if not _utf8(str(t))), None)
        if bad is not None:
            _fail(ckpt, f"corrupt header ({bad!r} is not UTF-8)", name)
    return header, 8 + n, raw, size


def _usize(x) -> bool:
    return type(x) is int and 0 <= x <= _USIZE_MAX


def _too_deep(value, room: int) -> bool:
    """Whether a parsed JSON value nests arrays/objects more than ``room`` deep."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return room == 0 or any(_too_deep(v, room - 1) for v in value)
    return False


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate escape (serde_json refuses it)
    except UnicodeEncodeError:
        return False
    return True


def _entries(path: Path, ckpt: str, header: dict, offset: int, size: int) -> dict[str, TensorEntry]:
    """The header's tensors, checked as the safetensors crate checks them: known dtypes,
    integer dims and offsets, byte size = numel x itemsize, and data offsets that, sorted,
    run contiguously from 0 to the end of the file (no gap, overlap or alias)."""
    name = path.name
    items = []
    for tname, e in header.items():
        if tname == "__metadata__":
            if e is not None and not (
                isinstance(e, dict) and all(isinstance(v, str) for v in e.values())
            ):
                _fail(ckpt, "corrupt header (__metadata__ must map strings to strings)", name)
            continue
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            _fail(ckpt, "corrupt header entry (needs dtype, shape, data_offsets)", name, tname)
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        problem = None
        if twice := sorted(e.repeated & {"dtype", "shape", "data_offsets"}):
            problem = f"{twice[0]} given twice"
        elif not isinstance(dtype, str) or dtype not in DTYPES:
            problem = f"no safetensors dtype {dtype!r}"
        elif not isinstance(shape, list) or not all(map(_usize, shape)):
            problem = f"shape {shape!r} is not a list of integers >= 0"
        elif not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_usize, offsets))):
            problem = f"data_offsets {offsets!r} are not 2 integers >= 0"
        elif len(e) > 3 and any(_too_deep(v, _EXTRA_DEPTH) for v in e.values()):
            problem = "nested too deeply"  # serde_json's limit: 127 levels in all
        else:
            numel = 1
            for d in shape:  # in order, as the crate's checked multiplication
                numel *= d
                if numel > _USIZE_MAX:
                    problem = f"shape {shape} overflows"
                    break
            bits = numel * DTYPES[dtype][0]
            if not problem and (bits > _USIZE_MAX or bits % 8):
                problem = f"{dtype}{shape} is not a whole number of bytes"
        if problem:
            _fail(ckpt, f"corrupt header: {problem}", name, tname)
        items.append((offsets[0], offsets[1], tname, dtype, tuple(shape), bits // 8))
    out: dict[str, TensorEntry] = {}
    end, last = 0, None
    for s, t, tname, dtype, shape, nbytes in sorted(items, key=lambda x: x[:2]):
        if t < s:
            _fail(ckpt, f"corrupt header: data_offsets {s}..{t} run backwards", name, tname)
        if s != end:
            what = f"overlap tensor {last}" if s < end else f"leave a gap after byte {end}"
            _fail(ckpt, f"corrupt header: data_offsets {s}..{t} {what}", name, tname)
        if t - s != nbytes:
            _fail(ckpt, f"corrupt header: {t - s} bytes for {dtype}{list(shape)}", name, tname)
        if offset + t > size:
            _fail(ckpt, f"truncated: data ends at byte {offset + t}, file has {size}", name, tname)
        out[tname] = TensorEntry(tname, str(path), dtype, shape, offset + s, offset + t)
        end, last = t, tname
    if offset + end != size:
        _fail(ckpt, f"corrupt: {size - offset - end} bytes after the last tensor's data", name)
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
        import torch

        e = self.entries[name]
        bits, torch_name = DTYPES[e.dtype]
        dtype = getattr(torch, torch_name or "", None)
        if bits % 8 or not isinstance(dtype, torch.dtype):
            _fail(
                self.ref,
                f"dtype {e.dtype} cannot be read as a tensor here",
                Path(e.file).name,
                name,
            )
        shape = e.shape if len(e.shape) >= 2 else (1, *e.shape)
        row_bytes = math.prod(shape[1:]) * (bits // 8)
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
            fd, _ = _open_regular(Path(file), self.ref)
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


def _shard_files(ckpt: str, root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """-> (the directory's safetensors files, the index's tensor -> shard map if it has one)."""
    index = root / INDEX_NAME
    if os.path.lexists(index):
        weight_map = _read_json(index, ckpt, "malformed index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and not Path(v).is_absolute() and ".." not in Path(v).parts
            for v in weight_map.values()
        ):
            _fail(
                ckpt,
                "malformed index (weight_map must map tensors to shard file names)",
                INDEX_NAME,
            )
        files = []
        for shard in sorted(set(weight_map.values())):
            if not os.path.lexists(root / shard):
                names = sorted(k for k, v in weight_map.items() if v == shard)
                _fail(ckpt, f"index names missing shard {shard}", INDEX_NAME, names[0])
            files.append(root / shard)
        return files, weight_map
    try:
        names = sorted(os.listdir(root))
    except OSError as err:
        _fail(ckpt, f"cannot list ({err.strerror})", root.name)
    files = [root / n for n in names if n.endswith(".safetensors")]
    if not files:
        _refuse_pickles(ckpt, [root / n for n in names])
        _fail(ckpt, f"no *.safetensors files in {root} (empty checkpoint)")
    return files, None


def fingerprint_files(files: list[Path], headers: list[bytes], ckpt: str = "") -> str:
    """sha256 over each file's name, size, header and 64 sampled 4 KiB data blocks.

    Headers alone would collide (a run and its base share names, shapes and offsets); the
    samples make a collision need identical bytes at 64 spread-out places of every file.
    """
    h = hashlib.sha256()
    for path, raw in zip(files, headers, strict=True):
        fd, size = _open_regular(path, ckpt or str(path))
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
        _fail(ref, f"cannot read ({err.strerror or err})", where)


def _open_local(ref: str, resolved: ResolvedRef, fingerprint: bool) -> Checkpoint:
    root = resolved.path
    try:
        mode = os.stat(root).st_mode
    except OSError as err:
        if isinstance(err, (FileNotFoundError, NotADirectoryError)):
            _fail(ref, f"path {root} does not exist")
        _fail(ref, f"cannot open ({err.strerror})", root.name)
    weight_map = None
    if stat.S_ISREG(mode):
        _refuse_pickles(ref, [root])
        if root.suffix != ".safetensors":
            _fail(ref, "not a .safetensors file or HF directory", root.name)
        files, cfg_path = [root], root.parent / "config.json"
    elif stat.S_ISDIR(mode):
        files, weight_map = _shard_files(ref, root)
        cfg_path = root / "config.json"
    else:
        kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
        _fail(ref, f"not a .safetensors file or HF directory ({kind})", root.name)
    config = None
    if os.path.lexists(cfg_path):
        config = _read_json(cfg_path, ref, "malformed config.json")
    entries: dict[str, TensorEntry] = {}
    raws = []
    for f in files:
        header, offset, raw, size = read_header(f, ref)
        raws.append(raw)
        for name, e in _entries(f, ref, header, offset, size).items():
            if name in entries:
                _fail(ref, f"tensor also in {Path(entries[name].file).name}", f.name, name)
            entries[name] = e
    for name, shard in (weight_map or {}).items():
        if name not in entries or Path(entries[name].file) != root / shard:
            _fail(ref, f"index places tensor in {shard} but it is not there", shard, name)
    fp = resolved.fingerprint or (fingerprint_files(files, raws, ref) if fingerprint else "")
    return Checkpoint(ref, root, entries, config, fp, files)
