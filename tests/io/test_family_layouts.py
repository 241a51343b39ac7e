"""Every tensor transformers saves for real multimodal, MLA and fused-projection layouts gets
its intended role, layer, depth and tower (checkpoints written by save_pretrained)."""

import json
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from rlvr_ray.io.families import family_for


def saved(model, path) -> tuple[dict, list[str]]:
    """Save ``model`` as transformers does -> (its config.json, the tensor names it wrote)."""
    model.save_pretrained(path, safe_serialization=True)
    names = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    return json.loads((path / "config.json").read_text()), names


def numbered(name: str) -> int | None:
    """The layer number a saved name carries (``layers.N.`` or ``blocks.N.``), by hand."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "blocks") and b.isdigit():
            return int(b)
    return None


def classified(config: dict, names: list[str]) -> dict[str, tuple]:
    """name -> (role, layer, depth, tower); every name's layer is the number it carries."""
    fam = family_for(config)
    got = {n: (i.role, i.layer, i.depth, i.tower) for n in names for i in [fam.classify(n)]}
    assert {n: v[1] for n, v in got.items()} == {n: numbered(n) for n in names}
    return got


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=256,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4,
    )
    return saved(Gemma3ForConditionalGeneration(cfg), tmp_path_factory.mktemp("gemma3"))


def test_gemma3_vision_tower_has_its_own_layers_and_depth(gemma3):
    config, names = gemma3
    got = classified(config, names)
    # text: 2 layers of q k v o gate up down + 6 norms (input, post-attn, pre/post-ff, q/k)
    text = Counter((r, layer) for r, layer, _, t in got.values() if t == "text")
    for layer in (0, 1):
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            assert text[(role, layer)] == 1
        assert text[("norm", layer)] == 6
    assert text[("embed", None)] == 1 and text[("norm", None)] == 1
    assert "lm_head.weight" not in names  # tied: not saved
    # vision (SigLIP): 3 layers of q k v o, fc1 (up) fc2 (down), 2 norms, 8 biases
    vision = Counter((r, layer) for r, layer, _, t in got.values() if t == "vision")
    for layer in (0, 1, 2):
        for role in ("q", "k", "v", "o", "up", "down"):
            assert vision[(role, layer)] == 1
        assert (vision[("norm", layer)], vision[("bias", layer)]) == (2, 8)
    assert vision[("embed", None)] == 2  # patch and position embeddings
    assert sum(vision.values()) == 3 * 16 + 2 + 1 + 2  # + post_layernorm weight and bias
    proj = {n: v for n, v in got.items() if v[3] == "projector"}
    assert proj == {
        "multi_modal_projector.mm_input_projection_weight": ("other", None, None, "projector"),
        "multi_modal_projector.mm_soft_emb_norm.weight": ("norm", None, None, "projector"),
    }
    assert len(got) == len(names) == 2 * 13 + 2 + 53 + 2
    # depth within the tower: vision layer 1 of 3 is half way, text layer 1 of 2 the last
    assert got["vision_tower.encoder.layers.1.self_attn.q_proj.weight"] == ("q", 1, 0.5, "vision")
    assert got["language_model.model.layers.1.self_attn.q_proj.weight"] == ("q", 1, 1.0, "text")
    fam = family_for(config)
    assert (
        fam.stand_in("lm_head.weight", names, config) == "language_model.model.embed_tokens.weight"
    )


def test_qwen2_5_vl_vision_blocks_and_merger(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=256,
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[2],
        ),
    )
    config, names = saved(Qwen2_5_VLForConditionalGeneration(cfg), tmp_path)
    got = classified(config, names)
    vision = Counter((r, layer) for r, layer, _, t in got.values() if t == "vision")
    for layer in (0, 1, 2):  # fused attn.qkv, attn.proj, gated MLP, norm1/2, 5 biases
        for role in ("qkv", "o", "gate", "up", "down"):
            assert vision[(role, layer)] == 1
        assert (vision[("norm", layer)], vision[("bias", layer)]) == (2, 5)
    assert vision[("embed", None)] == 1 and sum(vision.values()) == 3 * 12 + 1
    proj = Counter(r for r, layer, _, t in got.values() if t == "projector" and layer is None)
    assert proj == Counter({"norm": 1, "other": 2, "bias": 2})
    text = Counter((r, layer) for r, layer, _, t in got.values() if t == "text")
    assert text[("q", 1)] == text[("down", 1)] == 1 and text[("lm_head", None)] == 1
    assert got["visual.blocks.1.attn.qkv.weight"] == ("qkv", 1, 0.5, "vision")
    assert got["model.layers.1.self_attn.q_proj.weight"] == ("q", 1, 1.0, "text")


def test_deepseek_v3_mla_roles(tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        vocab_size=256,
    )
    config, names = saved(DeepseekV3ForCausalLM(cfg), tmp_path)
    got = classified(config, names)
    attn = {n.split("self_attn.")[1]: v[0] for n, v in got.items() if ".layers.1.self_attn." in n}
    assert attn == {
        "q_a_proj.weight": "q_a",
        "q_b_proj.weight": "q_b",
        "kv_a_proj_with_mqa.weight": "kv_a",
        "kv_b_proj.weight": "kv_b",
        "o_proj.weight": "o",
        "q_a_layernorm.weight": "norm",
        "kv_a_layernorm.weight": "norm",
    }
    assert not [n for n, v in got.items() if v[0] == "other"]
    assert all(v[3] == "text" for v in got.values())


def test_phi3_fused_projections(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
    )
    config, names = saved(Phi3ForCausalLM(cfg), tmp_path)
    got = classified(config, names)
    layer1 = {n.split("layers.1.")[1]: v[0] for n, v in got.items() if ".layers.1." in n}
    assert layer1 == {
        "self_attn.qkv_proj.weight": "qkv",
        "self_attn.o_proj.weight": "o",
        "mlp.gate_up_proj.weight": "gate_up",
        "mlp.down_proj.weight": "down",
        "input_layernorm.weight": "norm",
        "post_attention_layernorm.weight": "norm",
    }
