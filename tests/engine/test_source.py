"""A tensor's copy read through ``Source``: only a Checkpoint and a Buffers provider, no worker.

Rows served whole, streamed in windows read ahead, through the fused pass's window reader,
as one expert's matrix of a fused expert tensor, rounded from F32, and cut to a resized
vocabulary's head all equal numpy's view of the patterns in the file; a file cut under the
scan gives ReadFailed with the checkpoint's one-line error."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlvr_ray.engine.buffers import Buffers
from rlvr_ray.engine.source import ReadFailed, Source, reading
from rlvr_ray.io.checkpoint import open_checkpoint
from rlvr_ray.lab.planted import f32_to_bf16_bits


@pytest.fixture
def ckpt(tmp_path):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x7F00, size=(37, 11)).astype(np.uint16)  # finite bf16 patterns
    experts = rng.integers(0, 0x7F00, size=(3, 5, 7)).astype(np.uint16)
    f32 = rng.standard_normal((9, 4)).astype(np.float32)
    tensors = {
        "w": torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16),
        "experts": torch.from_numpy(experts.view(np.int16)).view(torch.bfloat16),
        "f": torch.from_numpy(f32),
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return open_checkpoint(str(tmp_path)), bits, experts, f32


def test_rows_whole_streamed_and_windowed_equal_the_file(ckpt, monkeypatch):
    from rlvr_ray.engine import source

    ck, bits, experts, f32 = ckpt
    want = bits.view(np.int16)
    buffers = Buffers(torch.device("cpu"))
    whole = Source(ck, "w", 0, False, buffers)
    assert whole.load() == bits.nbytes
    assert np.array_equal(whole.rows(0, 37).numpy(), want)
    monkeypatch.setattr(source, "STREAM_WINDOW_NUMEL", 33)  # 3 rows a window
    streamed = Source(ck, "w", 1, True, buffers)
    edges = [*range(0, 37, 2), 37]
    streamed.start(edges)
    with ThreadPoolExecutor(2) as pool:
        got = []
        for a, b in zip(edges[:-1], edges[1:]):
            if not streamed.in_memory(a, b):
                streamed.install(streamed.fetch(a, b, pool), pool)
            got.append(streamed.rows(a, b).numpy().copy())
        streamed.stop()
    assert np.array_equal(np.concatenate(got), want)
    buffers.layout(3, 5 * 11)
    read = streamed.window_reader(buffers.slot(2))
    assert read(30, 35) == 5 * 11 * 2
    assert np.array_equal(buffers.slot(2)[: 5 * 11], want[30:35].ravel())
    head = whole.head(4)
    assert head.shape == (4, 11) and np.array_equal(head.rows(0, 4).numpy(), want[:4])
    expert = Source(ck, "experts", 0, False, buffers, expert=2)
    expert.load()
    assert expert.shape == (5, 7)
    assert np.array_equal(expert.rows(0, 5).numpy(), experts[2].view(np.int16))
    rounded = Source(ck, "f", 0, False, buffers)
    rounded.load()
    assert rounded.rounded and np.array_equal(
        rounded.rows(0, 9).numpy(), f32_to_bf16_bits(f32).view(np.int16)
    )


def test_a_file_cut_under_the_read_is_a_one_line_read_failure(ckpt):
    ck, *_ = ckpt
    src = Source(ck, "w", 0, True, Buffers(torch.device("cpu")))
    entry = ck.entries["w"]
    os.truncate(entry.file, entry.start + 10 * 11 * 2)  # rows 10 onward are gone
    buffers = Buffers(torch.device("cpu"))
    buffers.layout(1, 37 * 11)
    read = src.window_reader(buffers.slot(0))
    assert reading(src, read, 0, 10) == 10 * 11 * 2
    with pytest.raises(ReadFailed) as err:
        reading(src, read, 8, 20)
    assert str(err.value) == (
        f"checkpoint {ck.ref}, file model.safetensors, tensor w: short read (44 of 264 bytes)"
    )
