"""Family recognition and the tensor-name -> (role, layer, depth, tower) map, driven by
families.json.

Qwen2/Qwen3, Llama, Mistral (and other Llama-like families) share one naming scheme, so they
share one entry; a new family is a new JSON entry, not new code. Unknown names get role
``other`` and are still scanned. Mixture-of-experts names carry their expert index
(``experts.N.``); a fused expert tensor (every expert stacked, ``experts.gate_up_proj``) is
recognised by name, and the planner cuts it into one matrix per expert. Multimodal checkpoints (Gemma-3, Qwen2.5-VL) hold more than
one tower: a vision tower's layers are numbered, and their depth measured, within that tower.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

ROLES = (
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "q_a",
    "q_b",
    "kv_a",
    "kv_b",
    "gate",
    "up",
    "down",
    "gate_up",
    "router",
    "embed",
    "lm_head",
    "norm",
    "bias",
    "scale",
    "sinks",
    "other",
)
TOWERS = ("text", "vision", "projector")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor sits in its model: canonical role, layer index and relative depth in
    [0, 1] within its tower, the tower ('text' unless the family says otherwise), and the
    expert index (a per-expert tensor's; None otherwise, fused expert tensors included)."""

    role: str
    layer: int | None
    depth: float | None
    tower: str = "text"
    expert: int | None = None


@dataclass(frozen=True)
class Tower:
    name: str
    match: re.Pattern
    layer_re: re.Pattern | None
    n_layers: int | None


@dataclass(frozen=True)
class Family:
    name: str  # the config's model_type, e.g. "qwen2" (or "unknown")
    layer_re: re.Pattern
    roles: tuple[tuple[re.Pattern, str], ...]
    n_layers: int | None
    towers: tuple[Tower, ...] = ()
    tied: tuple[re.Pattern, re.Pattern] | None = None  # (head, the embedding it may be tied to)
    expert_re: re.Pattern | None = None
    fused_re: re.Pattern | None = None

    def classify(self, tensor: str) -> TensorInfo:
        role = next((r for pat, r in self.roles if pat.search(tensor)), "other")
        tower = next((t for t in self.towers if t.match.search(tensor)), None)
        layer_re, n_layers = (
            (tower.layer_re, tower.n_layers) if tower else (self.layer_re, self.n_layers)
        )
        m = layer_re.search(tensor) if layer_re is not None else None
        layer = int(m.group(1)) if m else None
        depth = None
        if layer is not None:
            n = n_layers if n_layers else layer + 1
            depth = layer / (n - 1) if n > 1 else 0.0
        em = self.expert_re.search(tensor) if self.expert_re else None
        expert = int(em.group(1)) if em else None
        return TensorInfo(role, layer, depth, tower.name if tower else "text", expert)

    def fused_experts(self, tensor: str) -> bool:
        """Whether ``tensor`` stacks every expert on its first dimension."""
        return bool(self.fused_re and self.fused_re.search(tensor))

    def stand_in(self, tensor: str, names, config: dict | None) -> str | None:
        """The tensor of a checkpoint (its tensor ``names``, its ``config``) that is compared as
        ``tensor``: ``tensor`` itself when present; for an output head the checkpoint does
        not store, its tied input embedding (unless the config says the two are untied);
        else None."""
        if tensor in names:
            return tensor
        if self.tied is None or not self.tied[0].search(tensor) or not ties_embeddings(config):
            return None
        return next((n for n in sorted(names) if self.tied[1].search(n)), None)


def ties_embeddings(config: dict | None) -> bool:
    """Whether a checkpoint's output head is its input embedding: ``tie_word_embeddings`` of
    its config (or text_config); transformers' default, true, when neither sets it."""
    config = config or {}
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    return True


@lru_cache(maxsize=1)
def _table() -> dict:
    text = resources.files("rlvr_ray.io").joinpath("families.json").read_text()
    return json.loads(text)


def _layer_count(value) -> int | None:
    """A positive layer count from a config value (an int, or a float or digit string of
    one), else None: null, "many", 1e999 (inf), a bool or a negative count is unknown."""
    whole = isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if whole or (isinstance(value, str) and value.strip().isdecimal()):
        value = int(value)
    elif isinstance(value, bool):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _lookup(config: dict, key: str):
    """config[key], where 'a.b' looks inside config['a']; None when absent."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def family_for(config: dict | None) -> Family:
    """Pick the family entry for a parsed ``config.json`` (None or unknown -> the default)."""
    table = _table()
    config = config or {}
    model_type = str(config.get("model_type") or "").lower()
    entry_name = table["default"]
    for name, entry in table["families"].items():
        if model_type in entry["model_types"]:
            entry_name = name
            break
    entry = table["families"][entry_name]
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    counts = (_layer_count(c.get(k)) for c in (config, text_cfg) for k in entry["n_layers_keys"])
    n_layers = next((n for n in counts if n is not None), None)
    towers = []
    for t in entry.get("towers", []):
        counts = (_layer_count(_lookup(config, k)) for k in t["n_layers_keys"])
        n = next((c for c in counts if c is not None), None)
        layer_re = re.compile(t["layer"]) if t["layer"] else None
        towers.append(Tower(t["tower"], re.compile(t["match"]), layer_re, n))
    tied = entry.get("tied")
    return Family(
        name=model_type or "unknown",
        layer_re=re.compile(entry["layer"]),
        roles=tuple((re.compile(p), r) for p, r in entry["roles"]),
        n_layers=n_layers,
        towers=tuple(towers),
        tied=(re.compile(tied[0]), re.compile(tied[1])) if tied else None,
        expert_re=re.compile(entry["expert"]) if "expert" in entry else None,
        fused_re=re.compile(entry["fused_experts"]) if "fused_experts" in entry else None,
    )
