"""Tensor names -> (role, layer, depth) across families, from families.json."""

import pytest

from rlvr_ray.io.families import TensorInfo, family_for


@pytest.mark.parametrize(
    ("model_type", "name", "role", "layer"),
    [
        ("qwen2", "model.layers.3.self_attn.q_proj.bias", "bias", 3),
        ("qwen3", "model.layers.0.self_attn.q_norm.weight", "norm", 0),
        ("qwen3", "model.layers.7.self_attn.k_proj.weight", "k", 7),
        ("llama", "model.layers.1.mlp.down_proj.weight", "down", 1),
        ("mistral", "model.layers.2.self_attn.o_proj.weight", "o", 2),
        ("qwen3_moe", "model.layers.5.mlp.experts.17.up_proj.weight", "up", 5),
        ("qwen3_moe", "model.layers.5.mlp.gate.weight", "router", 5),
        ("mixtral", "model.layers.4.block_sparse_moe.experts.0.w1.weight", "gate", 4),
        ("llama", "model.embed_tokens.weight", "embed", None),
        ("llama", "lm_head.weight", "lm_head", None),
        ("llama", "model.norm.weight", "norm", None),
        ("gpt2", "transformer.h.2.attn.c_attn.weight", "qkv", 2),
        ("something-new", "model.layers.1.mystery.weight", "other", 1),
    ],
)
def test_roles_and_layers(model_type, name, role, layer):
    info = family_for({"model_type": model_type, "num_hidden_layers": 9}).classify(name)
    assert (info.role, info.layer) == (role, layer)
    assert info.depth == (None if layer is None else layer / 8)


def test_depth_without_a_layer_count_and_without_config():
    fam = family_for(None)
    assert fam.name == "unknown"
    assert fam.classify("model.layers.4.self_attn.v_proj.weight").depth == 1.0


@pytest.mark.parametrize("count", [None, "many", float("inf"), True, False, -3, 0, 2.5, [4], {}])
def test_a_layer_count_that_is_not_one_is_unknown(count):
    """Depth then comes from the layers seen, as when the key is absent."""
    fam = family_for({"model_type": "llama", "num_hidden_layers": count})
    assert fam.n_layers is None
    absent = family_for({"model_type": "llama"})
    name = "model.layers.3.mlp.up_proj.weight"
    assert fam.classify(name) == absent.classify(name) == TensorInfo("up", 3, 1.0)


def test_a_bad_count_falls_back_to_the_text_config():
    cfg = {
        "model_type": "llama",
        "num_hidden_layers": "many",
        "text_config": {"num_hidden_layers": 5.0},
    }
    assert family_for(cfg).n_layers == 5
    assert family_for({"model_type": "llama", "num_hidden_layers": "12"}).n_layers == 12


def test_config_json_with_1e999_layers_opens_and_plans(tmp_path):
    """The JSON number 1e999 parses as inf: the checkpoint opens and its depth is unknown."""
    import torch
    from safetensors.torch import save_file

    from rlvr_ray.io.checkpoint import open_checkpoint

    save_file(
        {"model.layers.1.mlp.up_proj.weight": torch.ones(2, 2)}, str(tmp_path / "m.safetensors")
    )
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1e999}')
    ck = open_checkpoint(str(tmp_path))
    assert ck.config["num_hidden_layers"] == float("inf")
    assert family_for(ck.config).classify("model.layers.1.mlp.up_proj.weight").depth == 1.0
