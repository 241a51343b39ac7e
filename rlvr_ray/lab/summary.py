"""Quick figures of a built lab: bf16 sparsity per run and the share of updates bf16 erased.

    python -c "from rlvr_ray.lab.summary import summarize_lab; print(summarize_lab('lab-out'))"

This is a self-check of the lab, not the atlas: it loads whole (tiny) checkpoints with
safetensors and compares raw bf16 bit patterns (+0 and -0 count as equal).

- ``sparsity``: share of weights whose bf16 bits equal the base's (over every tensor).
- ``erased``: for a run's fp32 master, among the coordinates where the master moved away from
  the base value (master != float(base)), the share whose bf16 rounding still equals the base:
  updates that the bf16 checkpoint hides (the precision gate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file


def _load(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _same_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BoolTensor: bf16 bit patterns equal (both zeros equal)."""
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    return (a16.view(torch.int16) == b16.view(torch.int16)) | ((a16 == 0) & (b16 == 0))


def sparsity(base: dict[str, torch.Tensor], run: dict[str, torch.Tensor]) -> float:
    """Share of coordinates whose bf16 bits are unchanged, over all tensors of ``base``."""
    same = sum(int(_same_bf16(base[k], run[k]).sum()) for k in base)
    return same / sum(v.numel() for v in base.values())


def erased_share(
    base: dict[str, torch.Tensor], master: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Moved fp32 coordinates (master != base) and the share of them bf16 rounds back to base."""
    moved = erased = total = 0
    for k, b in base.items():
        m = master[k].float()
        diff = m != b.float()
        moved += int(diff.sum())
        erased += int((diff & _same_bf16(m, b)).sum())
        total += b.numel()
    return {"moved_fp32": moved / total, "erased_of_moved": erased / max(1, moved)}


def summarize_lab(out: str | Path) -> dict[str, Any]:
    """Per group and run: algorithm, step, bf16 sparsity; per fp32-master step: erased share."""
    out = Path(out)
    sweep = yaml.safe_load((out / "sweep.yaml").read_text())
    result: dict[str, Any] = {}
    for group in sweep["groups"]:
        base = _load(out / group["base"])
        rows = {}
        for run in group["runs"]:
            ckpt = out / run["checkpoint"]
            row = {"algorithm": run["algorithm"], "step": run["step"]}
            row["sparsity"] = round(sparsity(base, _load(ckpt)), 4)
            master = ckpt.parent / "master_fp32" / ckpt.name
            if master.exists():
                row |= {k: round(v, 4) for k, v in erased_share(base, _load(master)).items()}
            rows[run["name"]] = row
        result[group["name"]] = rows
    return result
