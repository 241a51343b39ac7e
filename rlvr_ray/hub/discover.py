"""Finding the fine-tunes of a base on the Hub, and telling whether one looks like RL.

The Hub tags a model whose card says ``base_model: ORG/NAME`` with ``base_model:ORG/NAME`` and
``base_model:<relation>:ORG/NAME`` (relation: finetune, adapter, quantized, merge). Only full
fine-tunes are weight checkpoints of the same shapes, so the listing filters on
``base_model:finetune:ORG/NAME``, newest first (``sort=createdAt``; the Hub sorts descending).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from rlvr_ray.hub.client import api

#: tag -> algorithm label ('' when the tag says RL but not which algorithm)
RL_TAGS: dict[str, str] = {
    "grpo": "grpo",
    "dapo": "dapo",
    "ppo": "ppo",
    "rloo": "rloo",
    "gspo": "gspo",
    "reinforce++": "reinforce++",
    "reinforce": "reinforce++",
    "rlvr": "",
    "rl": "",
    "rlhf": "",
    "reinforcement-learning": "",
    "arxiv:2402.03300": "grpo",  # DeepSeekMath: GRPO
    "arxiv:2503.14476": "dapo",  # DAPO
}
_NAME_TOKENS = {"grpo", "dapo", "ppo", "rloo", "gspo", "rl", "rlvr", "zero"}
_ALGO_ORDER = ("grpo", "dapo", "gspo", "rloo", "reinforce++", "ppo")


@dataclass(frozen=True)
class Listed:
    """A model as the listing returns it."""

    repo: str
    sha: str | None
    created: datetime | None
    tags: tuple[str, ...]


def base_filter(base: str) -> str:
    return f"base_model:finetune:{base}"


def list_finetunes(base: str, limit: int) -> list[Listed]:
    """The newest ``limit`` full fine-tunes of ``base`` on the Hub, newest first."""
    models = api().list_models(
        filter=base_filter(base),
        sort="created_at",
        limit=limit,
        expand=["sha", "createdAt", "lastModified", "tags"],
    )
    out = [Listed(m.id, m.sha, m.created_at, tuple(m.tags or ())) for m in models if m.id != base]
    # the Hub already sorts, but a mirror may not: the order is part of the contract
    return sorted(out, key=lambda m: m.created.timestamp() if m.created else 0.0, reverse=True)


def rl_evidence(repo: str, tags: tuple[str, ...], card: dict) -> tuple[str | None, str | None]:
    """-> (why it looks like RL, e.g. "tags: grpo, trl"; None if nothing does, algorithm label).

    ``trl`` alone is not evidence (TRL also does SFT), but ``trl`` without an ``sft`` tag is.
    """
    all_tags = {t.lower() for t in tags} | {str(t).lower() for t in card.get("tags") or []}
    hits = sorted(t for t in all_tags if t in RL_TAGS)
    if "trl" in all_tags and "sft" not in all_tags and hits:
        hits.append("trl")
    name = repo.split("/", 1)[-1].lower()
    words = sorted(set(re.split(r"[^a-z0-9+]+", name)) & _NAME_TOKENS)
    parts = []
    if hits:
        parts.append("tags: " + ", ".join(hits))
    if words:
        parts.append("name: " + ", ".join(words))
    labels = {RL_TAGS.get(t, "") for t in hits} | set(words)
    algo = next((a for a in _ALGO_ORDER if a in labels), None)
    return ("; ".join(parts) or None), algo


def run_name(repo: str) -> str:
    """A run name for a repo id: ``org/Name`` -> ``org__Name`` (other odd characters -> '-')."""
    return re.sub(r"[^A-Za-z0-9._@+=-]", "-", repo.replace("/", "__"))
