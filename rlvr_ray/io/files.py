"""A checkpoint's files, read safely: regular files only, strict JSON, and safetensors headers
checked as the safetensors crate checks them, every defect a one-line CheckpointError.

The format is told by what a file is, never by its name; no tensor data is read here.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's limit
MAX_JSON_BYTES = 100_000_000  # config.json and the index: read whole, so bounded
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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_USIZE_MAX = 2**64 - 1  # safetensors' dims, offsets and sizes are u64
_JSON_SPACE = b" \t\r\n"
_EXTRA_DEPTH = 125  # nesting left to a tensor entry's extra keys under serde_json's limit


class CheckpointError(Exception):
    """A checkpoint cannot be read; the message is one line naming checkpoint, file, tensor."""


def _one_line(text: str) -> str:
    """``text`` with control characters escaped (a name may hold a newline)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(ckpt: str, msg: str, file: str | None = None, tensor: str | None = None):
    """Raise CheckpointError("checkpoint C, file F, tensor T: msg"), on one line."""
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


FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def open_regular(path: Path, ckpt: str) -> tuple[int, int]:
    """-> (a read-only descriptor, the size) of ``path`` if it is a regular file (never blocks:
    a FIFO is refused, not waited on); else a one-line error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        fail(ckpt, f"cannot open ({err.strerror})", path.name)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        fail(ckpt, f"not a regular file ({kind})", path.name)
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
        fail(ckpt, f"{what} (not UTF-8)", file)
    except RecursionError:
        fail(ckpt, f"{what} (nested too deeply)", file)
    except ValueError as e:  # JSONDecodeError, NaN/Infinity
        fail(ckpt, f"{what} (not JSON: {e})", file)


def read_json(path: Path, ckpt: str, what: str) -> dict:
    """A JSON object file (config.json, the index): regular, bounded, strict."""
    fd, size = open_regular(path, ckpt)
    try:
        if size > MAX_JSON_BYTES:
            fail(ckpt, f"{what} ({size} bytes > {MAX_JSON_BYTES} limit)", path.name)
        raw = _pread_all(fd, size, 0)
    finally:
        os.close(fd)
    return parse_json_object(raw, ckpt, path.name, what)


def parse_json_object(raw: bytes, ckpt: str, name: str, what: str) -> dict:
    """A JSON object from ``raw``, strict (as :func:`read_json`), or a one-line error."""
    data = _parse_json(raw, ckpt, name, what)
    if not isinstance(data, dict):
        fail(ckpt, f"{what} (not a JSON object)", name)
    return data


def read_header(path: Path, ckpt: str) -> tuple[dict, int, bytes, int]:
    """Parse a local file's safetensors header -> (entries json, data offset, raw header bytes,
    file size); see :func:`parse_header`."""
    fd, size = open_regular(path, ckpt)
    try:
        return parse_header(lambda n, at: _pread_all(fd, n, at), size, path.name, ckpt)
    finally:
        os.close(fd)


def parse_header(read, size: int, name: str, ckpt: str) -> tuple[dict, int, bytes, int]:
    """Parse the safetensors header of file ``name`` of ``size`` bytes, whose bytes
    ``read(n, offset)`` returns -> (entries json, data offset, raw header bytes, file size).

    The format is told by what the file is: a little-endian header length that fits the
    file followed by a JSON object is safetensors; pickle (0x80 + protocol 2..5) and zip
    (``PK\\x03\\x04``, torch.save) files are refused by their signatures; anything else is
    a corrupt header. Two reads: the 8-byte length, then the header itself."""
    head = read(8, 0) if size else b""
    if len(head) < 8:
        fail(ckpt, f"truncated: {size} bytes, shorter than the 8-byte header length", name)
    (n,) = struct.unpack("<Q", head)
    raw = read(n, 8) if n <= MAX_HEADER_BYTES and 8 + n <= size else b""
    if raw.lstrip(_JSON_SPACE)[:1] != b"{":
        if head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5):
            fail(ckpt, "a pickle/zip torch file named .safetensors; refused, never unpickled", name)
        if n > MAX_HEADER_BYTES:
            fail(
                ckpt,
                f"corrupt header: oversized header of {n} bytes > {MAX_HEADER_BYTES} limit",
                name,
            )
        if 8 + n > size:
            fail(ckpt, f"truncated: header of {n} bytes but file is {size} bytes", name)
        fail(ckpt, "corrupt header (not a JSON object after the 8-byte length)", name)
    header = _parse_json(raw, ckpt, name, "corrupt header")
    if not isinstance(header, dict):
        fail(ckpt, "corrupt header (not a JSON object)", name)
    if "__metadata__" in header.repeated:
        fail(ckpt, "corrupt header (__metadata__ given twice)", name)
    if b"\\u" in raw:  # an escape may be a lone surrogate, which serde_json refuses
        meta = header.get("__metadata__")
        texts = [*header, *(meta.items() if isinstance(meta, dict) else ())]
        bad = next((t for t in texts if not _utf8(str(t))), None)
        if bad is not None:
            fail(ckpt, f"corrupt header ({bad!r} is not UTF-8)", name)
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


def header_entries(
    path: Path, ckpt: str, header: dict, offset: int, size: int
) -> dict[str, TensorEntry]:
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
                fail(ckpt, "corrupt header (__metadata__ must map strings to strings)", name)
            continue
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            fail(ckpt, "corrupt header entry (needs dtype, shape, data_offsets)", name, tname)
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
            fail(ckpt, f"corrupt header: {problem}", name, tname)
        items.append((offsets[0], offsets[1], tname, dtype, tuple(shape), bits // 8))
    out: dict[str, TensorEntry] = {}
    end, last = 0, None
    for s, t, tname, dtype, shape, nbytes in sorted(items, key=lambda x: x[:2]):
        if t < s:
            fail(ckpt, f"corrupt header: data_offsets {s}..{t} run backwards", name, tname)
        if s != end:
            what = f"overlap tensor {last}" if s < end else f"leave a gap after byte {end}"
            fail(ckpt, f"corrupt header: data_offsets {s}..{t} {what}", name, tname)
        if t - s != nbytes:
            fail(ckpt, f"corrupt header: {t - s} bytes for {dtype}{list(shape)}", name, tname)
        if offset + t > size:
            fail(ckpt, f"truncated: data ends at byte {offset + t}, file has {size}", name, tname)
        out[tname] = TensorEntry(tname, str(path), dtype, shape, offset + s, offset + t)
        end, last = t, tname
    if offset + end != size:
        fail(ckpt, f"corrupt: {size - offset - end} bytes after the last tensor's data", name)
    return out
