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


# -- mixture-of-experts families, as transformers 5 saves them --------------------------------

#: what each saved tensor is, by name with its layer and expert indices taken out (a table
#: written by hand from the models' code, independent of families.json)
MOE_ROLES = {
    "model.embed_tokens.weight": "embed",
    "lm_head.weight": "lm_head",
    "model.norm.weight": "norm",
    "input_layernorm.weight": "norm",
    "post_attention_layernorm.weight": "norm",
    "self_attn.q_norm.weight": "norm",
    "self_attn.k_norm.weight": "norm",
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "bias",
    "self_attn.k_proj.bias": "bias",
    "self_attn.v_proj.bias": "bias",
    "self_attn.o_proj.bias": "bias",
    "self_attn.sinks": "sinks",
    # Qwen3-MoE / DeepSeek-V3 experts (also DeepSeek's dense first layer and shared experts)
    "mlp.experts.#.gate_proj.weight": "gate",
    "mlp.experts.#.up_proj.weight": "up",
    "mlp.experts.#.down_proj.weight": "down",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
    "mlp.shared_experts.gate_proj.weight": "gate",
    "mlp.shared_experts.up_proj.weight": "up",
    "mlp.shared_experts.down_proj.weight": "down",
    "mlp.gate.weight": "router",
    "mlp.gate.e_score_correction_bias": "router",
    # Qwen2-MoE's shared expert and its sigmoid gate ([1, hidden])
    "mlp.shared_expert.gate_proj.weight": "gate",
    "mlp.shared_expert.up_proj.weight": "up",
    "mlp.shared_expert.down_proj.weight": "down",
    "mlp.shared_expert_gate.weight": "router",
    # Mixtral
    "block_sparse_moe.experts.#.w1.weight": "gate",
    "block_sparse_moe.experts.#.w3.weight": "up",
    "block_sparse_moe.experts.#.w2.weight": "down",
    "block_sparse_moe.gate.weight": "router",
    # gpt-oss: fused experts
    "mlp.experts.gate_up_proj": "gate_up",
    "mlp.experts.down_proj": "down",
    "mlp.experts.gate_up_proj_bias": "bias",
    "mlp.experts.down_proj_bias": "bias",
    "mlp.router.weight": "router",
    "mlp.router.bias": "bias",
}
#: DeepSeek-V3's MLA attention: its roles are another table's business; layer and expert here
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "q_a_layernorm", "kv_a_layernorm")


def _where(name: str) -> tuple[str, int | None, int | None]:
    """Tensor name -> (name without its indices, layer, expert), by splitting on dots."""
    parts, layer, expert = name.split("."), None, None
    if parts[:2] == ["model", "layers"]:
        layer, parts = int(parts[2]), parts[3:]
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
        i = parts.index("experts") + 1
        expert, parts[i] = int(parts[i]), "#"
    return ".".join(parts), layer, expert


def _check_moe_family(family, path):
    from rlvr_ray.engine.config import Group, Params, Run
    from rlvr_ray.engine.plan import RunSpec, plan_group
    from rlvr_ray.io.checkpoint import open_checkpoint

    ck = open_checkpoint(str(path))
    group = Group(name="g", base=str(path), runs=[Run(name="r", checkpoint=str(path))])
    run = (RunSpec("r", str(path), ck.fingerprint), ck)
    plan = plan_group(group, ck, [run], Params(), 1 << 30)
    specs = [t for u in plan.units for t in u.tensors]
    assert {t.name for t in specs} == set(ck.entries)  # every saved tensor is planned
    n_experts = 4
    for name, e in ck.entries.items():
        mine = [t for t in specs if t.name == name]
        key, layer, expert = _where(name)
        fused = family == "gpt_oss" and key.startswith("mlp.experts.")
        if not any(m in key for m in MLA):
            assert {t.role for t in mine} == {MOE_ROLES[key]}, name
        assert {t.layer for t in mine} == {layer}, name
        if fused:  # one spec per expert, each that expert's matrix (or bias vector)
            assert [t.expert for t in mine] == list(range(n_experts)) and e.shape[0] == n_experts
            assert all(t.fused and t.shape == e.shape[1:] for t in mine), name
        else:
            assert [(t.expert, t.fused, t.shape) for t in mine] == [(expert, False, e.shape)], name
    keys = {_where(n)[0] for n in ck.entries}
    return keys


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_moe_families_saved_tensors_get_role_layer_expert(family, tmp_path):
    from moe_checkpoints import save_family

    keys = _check_moe_family(family, save_family(family, tmp_path / family))
    # the layouts transformers writes: per-expert tensors, except gpt-oss's fused ones
    fused = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert (fused <= keys) == (family == "gpt_oss")
    assert any("#" in k for k in keys) == (family != "gpt_oss")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_moe_families_at_real_hidden_sizes(family, tmp_path):
    from moe_checkpoints import save_family

    _check_moe_family(family, save_family(family, tmp_path / family, real=True))


@pytest.mark.parametrize(
    ("name", "role", "expert"),
    [
        ("model.layers.3.mlp.experts.12.gate_proj.weight_scale_inv", "scale", 12),
        ("model.layers.3.mlp.experts.12.gate_proj.weight", "gate", 12),
        ("model.layers.3.self_attn.o_proj.weight_scale_inv", "scale", None),
        ("model.layers.3.mlp.shared_experts.down_proj.weight_scale_inv", "scale", None),
        ("model.layers.3.mlp.experts.gate_up_proj_scales", "scale", None),
    ],
)
def test_fp8_scale_tensors_have_their_own_role(name, role, expert):
    info = family_for({"model_type": "deepseek_v3"}).classify(name)
    assert (info.role, info.layer, info.expert) == (role, 3, expert)
