"""The lab: small real checkpoint families (base, RL and SFT runs) trained on CPU.

No model hub is reachable from where this project is tested, so the lab trains its own: for
Qwen2, Llama and Mistral configs, a base pretrained on fixed-width addition, GRPO, DAPO-style
and REINFORCE++-style runs and an SFT run from it, with intermediate bf16 checkpoints and a sweep
YAML for ``rlvr-ray``. Build one with ``python -m rlvr_ray.lab --out lab-out`` or
``build_lab(Path("lab-out"))``. Importing this package is cheap: torch and transformers load
when a build starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_lab", "summarize_lab"]


def build_lab(out: Path, **kwargs: Any) -> Path:
    """Build (or reuse) a lab under ``out``; see ``rlvr_ray.lab.build.build_lab``."""
    from rlvr_ray.lab.build import build_lab as _build

    return _build(out, **kwargs)


def summarize_lab(out: Path) -> dict[str, Any]:
    """bf16 sparsity and erased shares of a built lab; see ``rlvr_ray.lab.summary``."""
    from rlvr_ray.lab.summary import summarize_lab as _summarize

    return _summarize(out)
