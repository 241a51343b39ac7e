"""The worker's geometry stage: which tensors get SVD-based statistics, the base decomposition
cache, and each run's geometry (``rlvr_ray.engine.tables`` makes it columns and spectra rows).

Each matrix gets its own k (`Params.ks`: relative to its short side unless set absolutely); a
decomposed matrix's geometry_status is 'ok', 'k_not_below_rank' or 'small_gap'
(`rlvr_ray.stats.spectral.geometry_status`), one that was not decomposed says why (`skip_reason`,
'skipped_<run status>', 'error: ...'). GEOMETRY_FLAGGED lists the decomposed-but-not-ok ones.

The base decomposition (`rlvr_ray.stats.spectral.BaseGeometry`: every singular value, the top
singular vectors a run's iteration starts from, principal and low-magnitude masks at one bit an
element: a fraction of the base's own bytes) is computed once per tensor per scan and reused
for every run; it is also stored under ``cache/<base fingerprint>/`` of the results directory,
keyed by a
hash of the base tensor's bytes and the parameters, so a later scan of a new run against a base
already seen does not decompose it again (and a stale entry can never be used).

Per run, besides `RunGeometry`'s columns, the stage measures the update dW = W1 - W0 itself
(`rlvr_ray.stats.update.update_geometry`: numerical, stable and effective rank, energy share in
the base's top-k subspaces). The spectra table holds the top spectral_k singular values and
angles, or every singular value with ``Params.full_spectrum`` (angles null past spectral_k).
torch (and the torch statistics) are imported by the first tensor that gets geometry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rlvr_ray.engine.config import Params
from rlvr_ray.engine.memory import EMBEDDING_ROLES, skip_reason  # noqa: F401 (re-exported)
from rlvr_ray.engine.source import FP8_DTYPES
from rlvr_ray.io.results import ResultsDir

if TYPE_CHECKING:
    import torch

    from rlvr_ray.stats.spectral import BaseGeometry, RunGeometry
    from rlvr_ray.stats.update import UpdateGeometry

GEOMETRY_VERSION = 2  # bump when BaseGeometry's contents change: old cache entries are ignored
#: decomposed, but the overlaps and angles are no finding (the views leave them out)
GEOMETRY_FLAGGED = ("k_not_below_rank", "small_gap")


class BaseCache:
    """Base decompositions by (base fingerprint, tensor bytes, parameters), on the results fs."""

    def __init__(self, results: ResultsDir):
        self.results = results
        self.hits = self.misses = 0

    def _key(self, bits0: torch.Tensor, params: Params) -> str:
        import torch

        rank_k, spectral_k = params.ks(tuple(bits0.shape))
        h = hashlib.blake2b(digest_size=16)
        h.update(bits0.detach().cpu().contiguous().view(torch.uint8).numpy())  # no copy
        h.update(f"v{GEOMETRY_VERSION}:{rank_k}:{params.alpha}:{spectral_k}".encode())
        return h.hexdigest()

    def get(self, base_fp: str, bits0: torch.Tensor, params: Params) -> BaseGeometry:
        """bits0: int16 bf16 patterns [m, n] of the base tensor -> its BaseGeometry."""
        import torch
        from safetensors.torch import load as st_load
        from safetensors.torch import save as st_save

        from rlvr_ray.stats.spectral import BaseGeometry, base_geometry

        fp = base_fp.replace(":", "-").replace("/", "-") or "unknown"
        rel = f"cache/{fp}/{self._key(bits0, params)}.safetensors"
        path = self.results.path(rel)
        try:
            with self.results.fs.open_input_stream(path) as f:
                d = st_load(f.read())
            self.hits += 1
            return BaseGeometry.from_tensors(d, bits0.device)
        except (FileNotFoundError, OSError):
            pass
        self.misses += 1
        rank_k, spectral_k = params.ks(tuple(bits0.shape))
        geo = base_geometry(bits0.view(torch.bfloat16), rank_k, params.alpha, spectral_k)
        blob = st_save(geo.to_tensors())
        self.results.write_bytes(rel, blob)
        return geo


@dataclass
class Geometry:
    """One run's geometry: the base's decomposition, the run's against it, and the update's."""

    base: BaseGeometry
    run: RunGeometry
    update: UpdateGeometry


def measure_geometry(
    cache: BaseCache, unit, spec, shape: tuple[int, ...], base, compared: list
) -> dict[int, Geometry | str]:
    """{run index: its Geometry, or the geometry_status saying why there is none} for the
    ``compared`` runs (each with ``run``, ``status`` and a ``src`` read whole) against the
    ``base`` source; the base is decomposed (or fetched from ``cache``) once for all."""
    reason = skip_reason(unit.params, spec.role, tuple(shape))
    if reason is None and base.dtype in FP8_DTYPES:
        reason = "skipped_fp8"  # the SVD of dequantized FP8 weights is not implemented
    if reason is not None:
        return {c.run: reason for c in compared}
    import torch

    from rlvr_ray.stats.masks import update_mask
    from rlvr_ray.stats.spectral import run_geometry
    from rlvr_ray.stats.update import update_geometry

    def bits(src) -> torch.Tensor:  # read whole: into the fused pass's arena, or a tensor
        return torch.from_numpy(src.full) if isinstance(src.full, np.ndarray) else src.full

    out: dict[int, Geometry | str] = {}
    base_geo = None
    bits0 = bits(base)
    for c in compared:
        if c.status != "ok":
            out[c.run] = f"skipped_{c.status}"
            continue
        try:
            if base_geo is None:
                base_geo = cache.get(unit.base_fingerprint, bits0, unit.params)
            bits1 = bits(c.src)
            mask = update_mask(bits0, bits1)
            w0, w1 = bits0.view(torch.bfloat16), bits1.view(torch.bfloat16)
            run = run_geometry(base_geo, w1, mask)
            update = update_geometry(base_geo, w0, w1)
        except (ValueError, RuntimeError) as e:  # e.g. a degenerate matrix: keep the row
            out[c.run] = f"error: {str(e).splitlines()[0][:200]}"
            continue
        out[c.run] = Geometry(base_geo, run, update)
    return out
