"""The value pass of an FP8 tensor: its copies dequantized with their own block scales.

The mask pass compares an FP8 copy's 8-bit patterns; the value statistics (``rel_frob``,
``max_abs_update``) need values, W = FP8 value x the scale of its block, read from the copy's
``<name>_scale_inv`` or ``<name>_scale`` tensor (one expert's slice of a fused one). Values are
float64 on the CPU, where those products are exact, a chunk of whole scale blocks at a time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rlvr_ray.engine.source import Source
from rlvr_ray.io.checkpoint import FLOAT_DTYPES, CheckpointError

if TYPE_CHECKING:
    import torch

#: names of an FP8 weight's scale tensor: ``<weight name><suffix>`` (W = fp8 value x scale)
SCALE_SUFFIXES = ("_scale_inv", "_scale")
#: elements of the base's copy dequantized at a time (rounded up to whole scale blocks)
VALUE_CHUNK_NUMEL = 1 << 20


def fp8_values(base: Source, runs: list[tuple[int, Source]]) -> dict[int, tuple]:
    """-> {run index: (sum of squared updates, the base's sum of squares over the rows
    compared, max |update|, None)}, or (None, 0, None, why) for a run whose scales cannot be
    used (every run, when the base's cannot)."""
    import torch

    quant = (base.ck.config or {}).get("quantization_config") or {}
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    scales, out = {}, {}
    for run, src in [(None, base), *runs]:
        try:
            scales[src.slot] = block_scale(src, block)
        except (ValueError, CheckpointError) as e:
            if run is None:
                return {r: (None, 0, None, str(e)) for r, _ in runs}
            out[run] = (None, 0, None, str(e))
    todo = [(run, src) for run, src in runs if run not in out]
    sums = {run: [0.0, 0.0, 0.0] for run, _ in todo}  # update sumsq, base sumsq, max |update|
    rows, cols = base.shape
    step = max(1, VALUE_CHUNK_NUMEL // max(cols, 1))
    blocks = math.lcm(scales[0][1], *(scales[src.slot][1] for _, src in todo))
    step = -(-step // blocks) * blocks  # whole blocks of every copy's scales
    for a in range(0, rows, step):
        base_values = dequantized(base, scales[0], a, min(a + step, rows))
        for run, src in todo:
            b = min(a + step, src.shape[0])
            if b <= a:
                continue
            update = dequantized(src, scales[src.slot], a, b) - base_values[: b - a]
            s = sums[run]
            s[0] += float(torch.dot(update.reshape(-1), update.reshape(-1)))
            s[1] += float(base_values[: b - a].square().sum())
            s[2] = max(s[2], float(update.abs().max())) if update.numel() else s[2]
    return out | {run: (s[0], s[1], s[2], None) for run, s in sums.items()}


def block_scale(src: Source, block: list | None) -> tuple[torch.Tensor, int, int]:
    """An FP8 copy's scales -> (scale per block [scale rows, scale cols] float64, block rows,
    block cols), block sizes from ``block`` (the config's ``weight_block_size``) or from the
    shapes; no scale tensor: 1 (the stored values are the weights). Raises ValueError naming
    the scale tensor when its shape does not tile the weight."""
    import torch

    rows, cols = src.stored_rows, src.shape[1]
    name = next((src.name + x for x in SCALE_SUFFIXES if src.name + x in src.ck.entries), None)
    if name is None:
        return torch.ones(1, 1, dtype=torch.float64), max(rows, 1), max(cols, 1)
    entry = src.ck.entries[name]
    if entry.dtype not in FLOAT_DTYPES:
        raise ValueError(f"checkpoint {src.ck.ref}, tensor {name}: scale dtype {entry.dtype}")
    scale = src.ck.read(name).to(torch.float64)
    weight_dims = len(src.ck.entries[src.name].shape)
    if src.expert is not None and scale.dim() == weight_dims and scale.dim() >= 2:
        scale = scale[src.expert]  # a fused tensor's scales: one expert's
    scale = scale.reshape(1, 1) if scale.numel() == 1 else scale.reshape(scale.shape[0], -1)
    scale_rows, scale_cols = scale.shape
    if block:
        block_rows, block_cols = int(block[0]), int(block[1])
    if not block or -(-rows // block_rows) != scale_rows or -(-cols // block_cols) != scale_cols:
        # no blocks in the config, or blocks that do not fit: take them from the shapes
        block_rows, block_cols = block_size(rows, scale_rows), block_size(cols, scale_cols)
    if -(-rows // block_rows) != scale_rows or -(-cols // block_cols) != scale_cols:
        raise ValueError(
            f"checkpoint {src.ck.ref}, tensor {name}: scale shape "
            f"{list(entry.shape)} does not tile the weight [{rows}, {cols}]"
        )
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"checkpoint {src.ck.ref}, tensor {name}: NaN/Inf scale")
    return scale, block_rows, block_cols


#: the block size FP8 checkpoints use (DeepSeek-V3's and Qwen's weight_block_size [128, 128])
USUAL_BLOCK = 128


def block_size(n: int, n_blocks: int) -> int:
    """The block size along a dimension of ``n`` elements cut into ``n_blocks`` blocks when the
    config does not give it: every size b with ceil(n / b) = n_blocks tiles it, and they place
    the edges differently unless n_blocks is 1. 128 where it tiles, else a power of two that
    does, else the smallest size that does (n_blocks < 1, or too many: no size tiles; the
    caller says so)."""
    if n_blocks < 1 or n == 0:
        return max(n, 1)
    lo = -(-n // n_blocks)  # the smallest size that tiles
    hi = (n - 1) // (n_blocks - 1) if n_blocks > 1 else max(n, USUAL_BLOCK)  # the largest
    if lo <= USUAL_BLOCK <= hi:
        return USUAL_BLOCK
    power = 1 << max(lo - 1, 0).bit_length()  # the smallest power of two >= lo
    return power if power <= hi else lo


def dequantized(src: Source, scale: tuple[torch.Tensor, int, int], a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of an FP8 copy (a: a multiple of the block rows) as float64 values [b - a,
    cols]: each FP8 value times the scale of its block."""
    import torch

    per_block, block_rows, block_cols = scale
    values = src.stored(a, b, ("value", src.slot)).to(torch.float64)
    rows_scale = per_block[a // block_rows : -(-b // block_rows)]
    rows_scale = rows_scale.repeat_interleave(block_rows, 0)[: b - a]
    return values * rows_scale.repeat_interleave(block_cols, 1)[:, : values.shape[1]]
