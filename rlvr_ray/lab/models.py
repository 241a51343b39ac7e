"""The lab's three architectures, built from transformers configs, and bf16 checkpoint writing.

``qwen2`` (Qwen2Config: q/k/v biases, rms eps 1e-6), ``llama`` (LlamaConfig, no biases) and
``mistral`` (MistralConfig, no sliding window at these lengths) share the shape knobs: hidden
size, layers, head_dim 16 (heads = hidden / 16), grouped-query attention with half as many
key/value heads, SwiGLU MLP of width 3 x hidden, untied lm_head (its own tensor), vocabulary of
16 tokens (``task.VOCAB``). Attention is "eager": at 13 tokens it is as fast as sdpa and its
reduction order is fixed.

Precision, as in real pipelines: training keeps fp32 master weights (and fp32 AdamW state);
every saved checkpoint is ``master.to(torch.bfloat16)``, written with safetensors under the
Hugging Face tensor names next to a ``config.json`` (``torch_dtype: bfloat16``). transformers is
imported inside the functions so that ``import rlvr_ray.lab`` stays cheap.

Device: a model is initialised on the CPU from its seed (the same initial weights on every
device) and then moved to the training device (``resolve_device``: ``auto`` is CUDA when
available); checkpoints are copied back to the CPU only when written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlvr_ray.lab.settings import ARCHS
from rlvr_ray.lab.task import BOS, EOS, PAD, VOCAB_SIZE

__all__ = [
    "ARCHS",
    "bf16_state",
    "load_rounded",
    "make_config",
    "new_model",
    "resolve_device",
    "rollout_copy",
    "save_checkpoint",
]
DEVICES = ("auto", "cpu", "cuda")
HEAD_DIM = 16


def make_config(arch: str, hidden: int, layers: int, max_positions: int = 32) -> Any:
    """A transformers config for ``arch`` (one of ``ARCHS``) at the lab's sizes."""
    import transformers

    if hidden % (2 * HEAD_DIM):
        raise ValueError(f"hidden={hidden} must be a multiple of {2 * HEAD_DIM}")
    heads = hidden // HEAD_DIM
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    if arch == "qwen2":
        return transformers.Qwen2Config(rms_norm_eps=1e-6, use_sliding_window=False, **common)
    if arch == "llama":
        return transformers.LlamaConfig(rms_norm_eps=1e-5, **common)
    if arch == "mistral":
        return transformers.MistralConfig(rms_norm_eps=1e-5, sliding_window=None, **common)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; ``cpu`` as is; ``cuda``
    when available, else a ValueError naming why."""
    if device not in DEVICES:
        raise ValueError(f"device: unknown {device!r}; expected one of {list(DEVICES)}")
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "auto":
        return "cpu"
    why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device found"
    raise ValueError(f"device cuda: CUDA is not available ({why}); use --device cpu or auto")


def new_model(config: Any, seed: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A freshly initialised fp32 ``*ForCausalLM`` for ``config`` (init seeded by ``seed``, on
    the CPU) on ``device``."""
    import transformers

    cls = {
        "qwen2": transformers.Qwen2ForCausalLM,
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[config.model_type]
    torch.manual_seed(seed)
    model = cls(config).float().to(device)
    model.train()
    return model


def bf16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights rounded to bf16 (round-to-nearest-even), HF names, contiguous."""
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def load_rounded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (any dtype) into ``model``'s fp32 parameters, in place."""
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(state[name].to(param.dtype))


def save_checkpoint(
    model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Write ``model`` as a Hugging Face directory: config.json + model.safetensors in ``dtype``.

    Tensors are ``param.to(dtype)``: for bf16 that is the rounding of the fp32 master weights
    (rounded on the model's device, then copied to the CPU).
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"]
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rollout_copy(master: torch.nn.Module, rollout: torch.nn.Module) -> None:
    """Load bf16(master) into ``rollout`` (fp32 compute), as an inference engine serving bf16."""
    with torch.no_grad():
        for p_out, p_in in zip(rollout.parameters(), master.parameters(), strict=True):
            p_out.copy_(p_in.to(torch.bfloat16))
