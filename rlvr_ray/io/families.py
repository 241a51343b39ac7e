"""Family recognition and the tensor-name -> (role, layer, depth) map, driven by families.json.

Qwen2/Qwen3, Llama, Mistral (and other Llama-like families) share one naming scheme, so they
share one entry; a new family is a new JSON entry, not new code. Unknown names get role
``other`` and are still scanned. Mixture-of-experts names carry their expert index
(``experts.N.``); a fused expert tensor (every expert stacked, ``experts.gate_up_proj``) is
recognised by name, and the planner cuts it into one matrix per expert.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "router", "embed",
         "lm_head", "norm", "bias", "scale", "sinks", "other")  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor sits in its model: canonical role, layer index, relative depth in [0, 1],
    expert index (a per-expert tensor's; None otherwise, fused expert tensors included)."""

    role: str
    layer: int | None
    depth: float | None
    expert: int | None = None


@dataclass(frozen=True)
class Family:
    name: str  # the config's model_type, e.g. "qwen2" (or "unknown")
    layer_re: re.Pattern
    roles: tuple[tuple[re.Pattern, str], ...]
    n_layers: int | None
    expert_re: re.Pattern | None = None
    fused_re: re.Pattern | None = None

    def classify(self, tensor: str) -> TensorInfo:
        role = next((r for pat, r in self.roles if pat.search(tensor)), "other")
        m = self.layer_re.search(tensor)
        layer = int(m.group(1)) if m else None
        depth = None
        if layer is not None:
            n = self.n_layers if self.n_layers else layer + 1
            depth = layer / (n - 1) if n > 1 else 0.0
        em = self.expert_re.search(tensor) if self.expert_re else None
        return TensorInfo(role, layer, depth, int(em.group(1)) if em else None)

    def fused_experts(self, tensor: str) -> bool:
        """Whether ``tensor`` stacks every expert on its first dimension."""
        return bool(self.fused_re and self.fused_re.search(tensor))


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


def family_for(config: dict | None) -> Family:
    """Pick the family entry for a parsed ``config.json`` (None or unknown -> the default)."""
    table = _table()
    config = config if isinstance(config, dict) else {}
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
    return Family(
        name=model_type or "unknown",
        layer_re=re.compile(entry["layer"]),
        roles=tuple((re.compile(p), r) for p, r in entry["roles"]),
        n_layers=n_layers,
        expert_re=re.compile(entry["expert"]) if "expert" in entry else None,
        fused_re=re.compile(entry["fused_experts"]) if "fused_experts" in entry else None,
    )
