"""The lazy safetensors reader: exact reads, fingerprints, and one-line errors for bad input."""

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
