"""The lazy safetensors reader: exact reads, fingerprints, and one-line errors for bad input."""

import contextlib
import json
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from rlvr_ray.io.checkpoint import CheckpointError, open_checkpoint


def test_sharded_reads_match_written_bits(qwen_family):
    ck = open_checkpoint(str(qwen_family.runs["grpo-a"]))
    assert len(ck.files) == 2 and ck.config["model_type"] == "qwen2"
    bits = qwen_family.bits["grpo-a"]
    assert set(ck.entries) == set(bits)
    for name in ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.bias"]:
        t = ck.read(name)
        assert t.dtype == torch.bfloat16
        np.testing.assert_array_equal(t.view(torch.int16).numpy().view(np.uint16), bits[name])


def test_fingerprint_tells_runs_apart_and_survives_a_copy(qwen_family, tmp_path):
    fps = {n: open_checkpoint(str(p)).fingerprint for n, p in qwen_family.runs.items()}
    fps["base"] = open_checkpoint(str(qwen_family.base)).fingerprint
    assert len(set(fps.values())) == len(fps)
    copy = shutil.copytree(qwen_family.base, tmp_path / "moved")
    assert open_checkpoint(str(copy)).fingerprint == fps["base"]


def _single(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4, 4, dtype=torch.bfloat16), "b": torch.zeros(3)}, str(path))
    return path


def expect(ref, *words):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(ref))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {ref}")
    for w in words:
        assert w in msg, msg
    return msg


def test_truncated_file(tmp_path):
    path = _single(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    expect(path, "m.safetensors", "truncated", "tensor")
    path.write_bytes(data[:5])
    expect(path, "truncated", "8-byte")


def test_oversized_and_corrupt_header(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    expect(path, "oversized header")
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    expect(path, "corrupt header")
    hdr = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 6]}}).encode()
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    expect(path, "tensor w", "6 bytes for BF16[2, 2]")


def test_pickle_checkpoint_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    (d / "config.json").write_text("{}")
    expect(d, "pickle checkpoint", "pytorch_model.bin", "never unpickles")
    expect(d / "pytorch_model.bin", "pickle checkpoint")
    (d / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    expect(d, "pickle/zip", "model.safetensors")
    assert not marker.exists()


def test_index_naming_a_missing_shard(qwen_family, tmp_path):
    d = shutil.copytree(qwen_family.base, tmp_path / "broken")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(idx["weight_map"].values()))[1]
    (d / shard).unlink()
    expect(d, "missing shard", shard, "model.safetensors.index.json", "tensor ")


def test_empty_directory_and_missing_path(tmp_path):
    expect(tmp_path, "no *.safetensors", "empty checkpoint")
    expect(tmp_path / "nope", "does not exist")


def test_duplicate_tensor_across_shards(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    expect(tmp_path, "tensor a", "also in")


# -- headers checked as safetensors checks them ---------------------------------------------------


def _raw_file(path, header: dict | bytes, data: bytes = b"") -> None:
    """A file from a hand-written header (bytes as they are, or a dict as JSON) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _safe_open_refuses(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            list(f.keys())
    except Exception:
        return True
    return False


def _u8(start: int, end: int, shape=None) -> dict:
    return {"dtype": "U8", "shape": shape or [end - start], "data_offsets": [start, end]}


def deep(n: int) -> list:
    return json.loads("[" * n + "]" * n)


ALIASED = {f"t{i}": _u8(0, 4) for i in range(2000)}
REFUSED = [
    (
        "overlap",
        {"a": _u8(0, 4), "b": _u8(2, 6)},
        6,
        "tensor b",
        "data_offsets 2..6 overlap tensor a",
    ),
    ("alias", ALIASED, 4, "tensor t1", "data_offsets 0..4 overlap tensor t0"),
    ("gap", {"a": _u8(0, 2), "b": _u8(3, 5)}, 5, "tensor b", "leave a gap after byte 2"),
    ("not_from_0", {"a": _u8(1, 3)}, 3, "tensor a", "leave a gap after byte 0"),
    (
        "backwards",
        {"a": {"dtype": "U8", "shape": [0], "data_offsets": [2, 0]}},
        2,
        "tensor a",
        "run backwards",
    ),
    ("string_dims", {"a": _u8(0, 1024, ["32", 32])}, 1024, "tensor a", "shape ['32', 32]"),
    ("float_dims", {"a": _u8(0, 1024, [32, 32.9])}, 1024, "tensor a", "shape [32, 32.9]"),
    ("integral_float", {"a": _u8(0, 4, [4.0])}, 4, "tensor a", "shape [4.0]"),
    ("bool_dims", {"a": _u8(0, 1, [True])}, 1, "tensor a", "shape [True]"),
    ("negative_dims", {"a": _u8(0, 0, [-1, 0])}, 0, "tensor a", "shape [-1, 0]"),
    ("huge_dims", {"a": _u8(0, 0, [2**64, 0])}, 0, "tensor a", "integers >= 0"),
    ("overflow", {"a": _u8(0, 0, [2**40, 2**40, 0])}, 0, "tensor a", "overflows"),
    ("no_dtype", {"a": {**_u8(0, 4), "dtype": "F7"}}, 4, "tensor a", "no safetensors dtype 'F7'"),
    (
        "lower_dtype",
        {"a": {**_u8(0, 4), "dtype": "u8"}},
        4,
        "tensor a",
        "no safetensors dtype 'u8'",
    ),
    (
        "half_byte",
        {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}},
        2,
        "tensor a",
        "F4[3] is not a whole number of bytes",
    ),
    (
        "wrong_size",
        {"a": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 5]}},
        5,
        "tensor a",
        "5 bytes for F8_E8M0[4]",
    ),
    ("offsets_3", {"a": {**_u8(0, 2), "data_offsets": [0, 2, 2]}}, 2, "tensor a", "data_offsets"),
    ("entry_list", {"a": [1]}, 0, "tensor a", "needs dtype, shape, data_offsets"),
    (
        "metadata_int",
        {"__metadata__": {"x": 1}, "a": _u8(0, 2)},
        2,
        "m.safetensors",
        "__metadata__",
    ),
    ("trailing_bytes", {"a": _u8(0, 2)}, 3, "m.safetensors", "1 bytes after the last tensor"),
    ("nan", b'{"__metadata__":{"x":NaN}}', 0, "m.safetensors", "NaN is not JSON"),
    (
        "nested",
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        0,
        "m.safetensors",
        "nested too deeply",
    ),
    ("not_utf8", b'{"\xff":1}', 0, "m.safetensors", "not UTF-8"),
    (
        "twice",
        b'{"a":{"dtype":"F32","dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
        2,
        "tensor a",
        "dtype given twice",
    ),
    (
        "meta_twice",
        b'{"__metadata__":{},"__metadata__":{}}',
        0,
        "m.safetensors",
        "__metadata__ given twice",
    ),
    ("extra_deep", {"a": {**_u8(0, 2), "x": deep(126)}}, 2, "tensor a", "nested too deeply"),
    (
        "surrogate",
        b'{"\\ud800":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
        2,
        "m.safetensors",
        "is not UTF-8",
    ),
    ("list", b"[]", 0, "m.safetensors", "not a JSON object"),
    ("junk", b"{} x", 0, "m.safetensors", "corrupt header (not JSON"),
    ("no_brace", b"  \x00 ", 0, "m.safetensors", "not a JSON object after the 8-byte length"),
]


@pytest.mark.parametrize(
    ("header", "size", "where", "what"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_headers_safetensors_refuses_are_refused_in_one_line(tmp_path, header, size, where, what):
    path = tmp_path / "m.safetensors"
    _raw_file(path, header, b"\0" * size)
    assert _safe_open_refuses(path)  # the reference implementation agrees it is not valid
    expect(path, "file m.safetensors", where, what)


def test_every_safetensors_dtype_opens_and_unknown_ones_are_corrupt(tmp_path):
    """F8_E8M0 (MXFP8 scales), sub-byte F4/F6, C64 ...: opened and sized as safetensors does."""
    from safetensors import safe_open

    sizes = {
        "BOOL": 1,
        "U8": 1,
        "I8": 1,
        "F8_E5M2": 1,
        "F8_E4M3": 1,
        "F8_E8M0": 1,
        "F8_E4M3FNUZ": 1,
        "F8_E5M2FNUZ": 1,
        "I16": 2,
        "U16": 2,
        "F16": 2,
        "BF16": 2,
        "I32": 4,
        "U32": 4,
        "F32": 4,
        "C64": 8,
        "F64": 8,
        "I64": 8,
        "U64": 8,
        "F4": 0.5,
        "F6_E2M3": 0.75,
        "F6_E3M2": 0.75,
    }
    header, at = {}, 0
    for dtype, size in sizes.items():
        n = int(8 * size)
        header[dtype.lower()] = {"dtype": dtype, "shape": [2, 4], "data_offsets": [at, at + n]}
        at += n
    path = tmp_path / "m.safetensors"
    _raw_file(path, header, bytes(i % 256 for i in range(at)))
    with safe_open(str(path), "numpy") as f:
        assert set(f.keys()) == set(header)
    ck = open_checkpoint(str(path))
    assert {n: (e.dtype, e.shape, e.nbytes) for n, e in ck.entries.items()} == {
        d.lower(): (d, (2, 4), int(8 * s)) for d, s in sizes.items()
    }
    scale = ck.read("f8_e8m0")  # an 8-bit dtype torch knows reads as itself
    assert scale.dtype == torch.float8_e8m0fnu
    assert scale.view(torch.uint8).flatten().tolist() == list(range(40, 48))
    with pytest.raises(CheckpointError, match="dtype F4 cannot be read as a tensor"):
        ck.read("f4")


def test_valid_edge_headers_open(tmp_path):
    """A zero-element [2^40, 0] tensor, leading whitespace, null metadata, extra entry keys
    nested as deep as safetensors reads them."""
    path = tmp_path / "m.safetensors"
    header = {
        "__metadata__": None,
        "e": _u8(0, 0, [2**40, 0]),
        "z": _u8(0, 0, [0]),
        "a": {**_u8(0, 2), "extra": deep(125)},  # 127 levels in all: serde_json's limit
    }
    _raw_file(path, b"\n " + json.dumps(header).encode(), b"\1\2")
    assert not _safe_open_refuses(path)
    ck = open_checkpoint(str(path))
    assert ck.entries["e"].shape == (2**40, 0) and ck.entries["e"].nbytes == 0
    assert ck.read("a").tolist() == [1, 2]


def test_torch_save_files_named_safetensors_are_refused_by_signature(tmp_path):
    path = tmp_path / "m.safetensors"
    torch.save({"w": torch.ones(2)}, str(path))  # a zip
    expect(path, "pickle/zip")
    for protocol in (2, 3, 4, 5):
        path.write_bytes(pickle.dumps({"w": [1.0] * 40}, protocol=protocol))
        expect(path, "pickle/zip")
    path.write_bytes(pickle.dumps({"w": 1}, protocol=0))  # no signature: just not safetensors
    expect(path, "corrupt header")


# -- every defect of a checkpoint's files is a CheckpointError ----------------------------------


def _dir_ckpt(tmp_path, name="ck"):
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return d


def _expect_soon(ref, *words):
    """``expect`` that must return within 30 s (a FIFO opened for reading would block)."""
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(expect(ref, *words)), daemon=True)
    t.start()
    t.join(30)
    assert got, f"open_checkpoint({ref}) still blocked after 30 s"


@pytest.mark.parametrize(
    "name", ["model.safetensors", "config.json", "model.safetensors.index.json"]
)
def test_a_fifo_is_refused_not_waited_on(tmp_path, name):
    import os

    d = _dir_ckpt(tmp_path)
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name)
    try:
        _expect_soon(d, f"file {name}", "not a regular file (a FIFO)")
        if name == "model.safetensors":
            _expect_soon(d / name, "a FIFO")
    finally:  # release a reader that did block
        with contextlib.suppress(OSError):
            os.close(os.open(d / name, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b'{"model_type": "llama\xff"}', "malformed config.json (not UTF-8)"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed config.json (nested too deeply)"),
        (b'["llama"]', "malformed config.json (not a JSON object)"),
        (b'{"model_type": NaN}', "malformed config.json (not JSON: NaN is not JSON)"),
    ],
    ids=["not_utf8", "nested", "list", "nan"],
)
def test_malformed_config_json(tmp_path, content, what):
    d = _dir_ckpt(tmp_path)
    (d / "config.json").write_bytes(content)
    expect(d, "file config.json", what)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b'{"weight_map": {"w": "model.safetensors"}}\xff', "malformed index (not UTF-8)"),
        (b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed index (nested"),
        (b"[]", "malformed index (not a JSON object)"),
        (b'{"weight_map": ["model.safetensors"]}', "weight_map must map tensors to shard"),
        (b'{"weight_map": {"w": 3}}', "weight_map must map tensors to shard"),
        (
            b'{"weight_map": {"w": "../ck/model.safetensors"}}',
            "weight_map must map tensors to shard",
        ),
    ],
    ids=["not_utf8", "nested", "list", "list_map", "int_shard", "parent_dir"],
)
def test_malformed_index(tmp_path, content, what):
    d = _dir_ckpt(tmp_path)
    (d / "model.safetensors.index.json").write_bytes(content)
    expect(d, "file model.safetensors.index.json", what)


def test_shards_that_are_not_readable_files(tmp_path):
    import os

    d = _dir_ckpt(tmp_path)
    (d / "loop.safetensors").symlink_to("loop.safetensors")
    expect(d, "file loop.safetensors", "cannot open (Too many levels of symbolic links)")
    (d / "loop.safetensors").unlink()
    (d / "dir.safetensors").mkdir()
    expect(d, "file dir.safetensors", "not a regular file (a directory)")
    (d / "dir.safetensors").rmdir()
    index = {"weight_map": {"w": "model.safetensors", "v": "gone.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "gone.safetensors").symlink_to("gone.safetensors")  # exists as a link: a loop
    expect(d, "file gone.safetensors", "Too many levels of symbolic links")
    os.unlink(d / "gone.safetensors")
    (d / "gone.safetensors").symlink_to("nowhere")  # a dangling link
    expect(d, "file gone.safetensors", "cannot open (No such file or directory)")
    (tmp_path / "loop").symlink_to("loop")
    expect(tmp_path / "loop", "cannot open (Too many levels of symbolic links)")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_files(tmp_path):
    d = _dir_ckpt(tmp_path)
    (d / "model.safetensors").chmod(0)
    expect(d, "file model.safetensors", "cannot open (Permission denied)")
    (d / "model.safetensors").chmod(0o644)
    d.chmod(0o300)
    expect(d, "cannot list (Permission denied)")
    d.chmod(0o755)


def test_newlines_in_names_stay_on_one_line(tmp_path):
    path = tmp_path / "m.safetensors"
    _raw_file(path, {"a\nb": _u8(0, 3, [2])}, b"\0" * 3)
    expect(path, "tensor a\\nb", "3 bytes for U8[2]")


def test_reading_headers_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, rlvr_ray.io.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
