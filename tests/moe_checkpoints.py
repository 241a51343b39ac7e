"""Mixture-of-experts checkpoints as transformers 5 saves them (``save_pretrained`` of a model
built from the family's config class), at small widths or at the real hidden sizes.

What transformers 5.x writes (checked for each, at both widths): Qwen3-MoE, Qwen2-MoE (with
its shared expert and that expert's [1, hidden] gate), Mixtral and DeepSeek-V3 save one tensor
per expert (``mlp.experts.N.gate_proj.weight``,
``block_sparse_moe.experts.N.w1.weight``); gpt-oss saves its experts fused:
``mlp.experts.gate_up_proj`` [experts, hidden, 2 x inter], ``mlp.experts.down_proj``
[experts, inter, hidden] and their biases [experts, n].
"""

from __future__ import annotations

import torch

#: family -> (config class name, small-width kwargs, real-width kwargs): real hidden sizes
#: (Qwen3-30B-A3B 2048, Qwen1.5-MoE-A2.7B 2048, Mixtral-8x7B 4096, DeepSeek-V3 7168, gpt-oss-20b 2880) with few layers,
#: 4 experts, a small vocabulary, and narrower MLPs / fewer heads where the real ones would
#: make a test checkpoint gigabytes
FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
        ),
        dict(num_hidden_layers=1, num_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=1024,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
        dict(num_hidden_layers=1, num_experts=4, num_experts_per_tok=2),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2),
        dict(
            hidden_size=4096, intermediate_size=1024, num_attention_heads=32, num_key_value_heads=8
        ),
        dict(num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        dict(
            hidden_size=7168,
            intermediate_size=512,
            moe_intermediate_size=256,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
        ),
        dict(
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        dict(
            hidden_size=2880,
            intermediate_size=720,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
        ),
        dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    ),
}


def save_family(family: str, path, real: bool = False, seed: int = 0):
    """Build the family's model from its config class (bf16, random init) and save_pretrained
    it to ``path`` -> path."""
    import transformers

    cls, small, wide, common = FAMILIES[family]
    cfg = getattr(transformers, cls)(**(wide if real else small), **common, vocab_size=256)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    return path
