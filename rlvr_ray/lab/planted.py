"""Planted checkpoint families: real HF-layout bf16 safetensors with known, planted updates.

Used by the tests (exact answers are computed from the numpy bit patterns returned here), by
``benchmarks/scan_throughput.py`` (real Qwen2-0.5B shapes) and by the quick demo until the lab
has trained its families. Updates move chosen coordinates by a few bf16 ULPs; a shared
row/column preference across runs plants the stripes that real RL runs show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SHAPES = {
    # model_type -> (hidden, intermediate, heads, kv_heads, vocab, qkv bias)
    "qwen2": (32, 64, 4, 2, 96, True),
    "llama": (32, 48, 4, 4, 80, False),
    "mistral": (32, 48, 4, 1, 80, False),
}
QWEN2_05B = (896, 4864, 14, 2, 151936, True)


def tensor_shapes(model_type: str, layers: int, dims=None) -> dict[str, tuple[int, ...]]:
    """HF tensor names -> shapes of a Llama-like model (dims: see SHAPES)."""
    h, inter, heads, kv, vocab, bias = dims or SHAPES[model_type]
    hd = h // heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if bias:
            for x in "qkv":
                out[p + f"self_attn.{x}_proj.bias"] = (out[p + f"self_attn.{x}_proj.weight"][0],)
    out |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    return out


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 patterns, round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f64(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def random_base(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """bf16 patterns of a weight-like tensor (1-D: norm-like around 1)."""
    if len(shape) == 1:
        return f32_to_bf16_bits(1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
    scale = 1.0 / np.sqrt(shape[1])
    return f32_to_bf16_bits(scale * rng.standard_normal(shape, dtype=np.float32))


def move_ulps(bits: np.ndarray, mask: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Move masked bf16 patterns by ``steps`` representable values (sign-magnitude aware)."""
    b = bits.astype(np.int32)
    key = np.where(b >= 0x8000, -(b & 0x7FFF), b)
    key = np.where(mask, key + steps, key)
    out = np.where(key < 0, (-key) | 0x8000, key)
    return out.astype(np.uint16)


def plant_update(
    base: np.ndarray,
    density: float,
    rng: np.random.Generator,
    row_pref: np.ndarray | None = None,
    max_ulp: int = 3,
) -> np.ndarray:
    """A run's bits: ~density of coordinates moved by +-1..max_ulp ULPs (mostly 1)."""
    p = np.full(base.shape, density)
    if row_pref is not None and base.ndim == 2:
        p = np.clip(p * row_pref[:, None], 0, 1)
    mask = rng.random(base.shape) < p
    mags = rng.choice(
        np.arange(1, max_ulp + 1),
        size=base.shape,
        p=np.array([0.7] + [0.3 / (max_ulp - 1)] * (max_ulp - 1)) if max_ulp > 1 else None,
    )
    steps = mags * rng.choice([-1, 1], size=base.shape)
    return move_ulps(base, mask, steps)


def write_checkpoint(
    path: Path, tensors: dict[str, np.ndarray], model_type: str, layers: int, shards: int = 1
) -> Path:
    """Write uint16-pattern arrays as a bf16 HF directory (sharded with an index if shards > 1)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_type": model_type,
        "num_hidden_layers": layers,
        "torch_dtype": "bfloat16",
        "architectures": [f"{model_type.capitalize()}ForCausalLM"],
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    as_t = {
        k: torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
        for k, v in tensors.items()
    }
    if shards <= 1:
        save_file(as_t, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(as_t)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: as_t[k] for k in names[s::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    index = {
        "metadata": {"total_size": sum(t.numel() * 2 for t in as_t.values())},
        "weight_map": weight_map,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return path


@dataclass
class PlantedFamily:
    base: Path
    runs: dict[str, Path]
    bits: dict[str, dict[str, np.ndarray]]  # "base" and each run name -> tensor -> uint16


def planted_family(
    root: Path,
    model_type: str = "qwen2",
    layers: int = 2,
    runs: dict[str, float] | None = None,
    seed: int = 0,
    shards: int = 1,
    dims=None,
    stripes: bool = True,
) -> PlantedFamily:
    """A base and runs (name -> update density) of one family, written under ``root``."""
    runs = runs or {"grpo-a": 0.3, "grpo-b": 0.3, "dapo": 0.4, "sft": 0.97}
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(model_type, layers, dims)
    base = {k: random_base(s, rng) for k, s in shapes.items()}
    prefs = {
        k: rng.gamma(0.7, 1 / 0.7, size=s[0]) if stripes and len(s) == 2 else None
        for k, s in shapes.items()
    }
    bits = {"base": base}
    out = PlantedFamily(write_checkpoint(root / "base", base, model_type, layers, shards), {}, bits)
    for name, density in runs.items():
        t = {k: plant_update(v, density, rng, prefs[k]) for k, v in base.items()}
        bits[name] = t
        out.runs[name] = write_checkpoint(root / name, t, model_type, layers, shards)
    return out
