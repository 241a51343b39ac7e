"""Headers of every length: the reader opens every file safetensors opens, bit for bit.

The first byte of a safetensors file is the low byte of its little-endian header length, so a
format sniff that looks at it alone mistakes lengths of 128 mod 256 for pickle. Files here are
written by the real ``safetensors`` library (its headers are padded to 8 bytes; other lengths
re-pad the library's header with JSON whitespace, which ``safe_open`` reads too).
"""

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlvr_ray.io.checkpoint import open_checkpoint

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def header_length(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def write_with_header_length(path, tensors: dict, n: int) -> None:
    """``tensors`` saved by safetensors, its header then re-padded with spaces to ``n`` bytes."""
    save_file(tensors, str(path))
    data = path.read_bytes()
    m = header_length(path)
    header = data[8 : 8 + m].rstrip(b" ")
    assert len(header) <= n, (len(header), n)
    header += b" " * (n - len(header))
    path.write_bytes(struct.pack("<Q", n) + header + data[8 + m :])


def random_tensors(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(int(rng.integers(1, 5))):
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        shape = tuple(int(d) for d in rng.integers(0, 6, size=int(rng.integers(0, 4))))
        top = 2 if dtype == torch.bool else 256
        raw = rng.integers(0, top, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
        t = (
            torch.from_numpy(raw).view(dtype).reshape(shape)
            if raw.size
            else torch.empty(shape, dtype=dtype)
        )
        out[f"t{i}.{'é' * int(rng.integers(0, 3))}"] = t
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_reads_like_safe_open(path) -> None:
    ck = open_checkpoint(str(path))
    with safe_open(str(path), "pt") as f:
        assert set(ck.entries) == set(f.keys())
        for name in ck.entries:
            want = f.get_tensor(name)
            got = ck.read(name)
            assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), name
            assert raw_bytes(got) == raw_bytes(want), name
    ck.close()


@pytest.mark.parametrize("n", [128, 384, 640, 896, 1152, 1408, 0x8000, 0x8080, 0x18080])
def test_header_lengths_that_look_like_a_pickle_opcode(tmp_path, n):
    """0x80 as the first byte (and 2..5 after it: pickle's protocol byte) or in other bytes."""
    path = tmp_path / "model.safetensors"
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)}
    write_with_header_length(path, tensors, n)
    assert path.read_bytes()[0] == 0x80 or n % 256 == 0
    assert_reads_like_safe_open(path)


def test_every_header_length_residue_with_random_tensors(tmp_path):
    rng = np.random.default_rng(7)
    for residue in range(256):
        path = tmp_path / f"r{residue}.safetensors"
        tensors = random_tensors(rng)
        save_file(tensors, str(path))
        n = header_length(path) + (residue - header_length(path)) % 256
        write_with_header_length(path, tensors, n)
        assert header_length(path) % 256 == residue
        assert_reads_like_safe_open(path)


def test_library_written_lengths_of_every_residue_the_library_writes(tmp_path):
    """The library's own padding (lengths of 0 mod 8): every one of the 32 residues mod 256."""
    seen = set()
    path = tmp_path / "m.safetensors"
    for pad in range(256):
        save_file({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, str(path), {"p": "x" * pad})
        n = header_length(path)
        seen.add(n % 256)
        header = json.loads(path.read_bytes()[8 : 8 + n])
        assert header["__metadata__"]["p"] == "x" * pad
        assert_reads_like_safe_open(path)
    assert seen == set(range(0, 256, 8))
