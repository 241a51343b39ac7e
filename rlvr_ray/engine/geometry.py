"""The worker's geometry stage: which tensors get SVD-based statistics, the base decomposition
cache, and the rows the stage adds (tensors columns, the spectra table).

Each matrix gets its own k (`Params.ks`: relative to its short side unless set absolutely); a
decomposed matrix's geometry_status is 'ok', 'k_not_below_rank' or 'small_gap'
(`rlvr_ray.stats.spectral.geometry_status`), one that was not decomposed says why (`skip_reason`,
'skipped_<run status>', 'error: ...'). GEOMETRY_FLAGGED lists the decomposed-but-not-ok ones.

The base decomposition (`rlvr_ray.stats.spectral.BaseGeometry`: every singular value, the top
singular vectors a run's iteration starts from, principal and low-magnitude masks at one bit an
element: a fraction of the base's own bytes) is computed once per tensor per scan and reused
for every run; it is also stored under ``cache/<base fingerprint>/`` of the results directory, keyed by a
hash of the base tensor's bytes and the parameters, so a later scan of a new run against a base
already seen does not decompose it again (and a stale entry can never be used).

Per run, besides `RunGeometry`'s columns, the stage measures the update dW = W1 - W0 itself
(`rlvr_ray.stats.update.update_geometry`: numerical, stable and effective rank, energy share in
the base's top-k subspaces). The spectra table holds the top spectral_k singular values and
angles, or every singular value with ``Params.full_spectrum`` (angles null past spectral_k).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, fields

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rlvr_ray.engine.config import Params
from rlvr_ray.engine.memory import EMBEDDING_ROLES, skip_reason  # noqa: F401 (re-exported)
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.stats.spectral import BaseGeometry, RunGeometry, base_geometry
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
        rank_k, spectral_k = params.ks(tuple(bits0.shape))
        h = hashlib.blake2b(digest_size=16)
        h.update(bits0.detach().cpu().contiguous().view(torch.uint8).numpy())  # no copy
        h.update(f"v{GEOMETRY_VERSION}:{rank_k}:{params.alpha}:{spectral_k}".encode())
        return h.hexdigest()

    def get(self, base_fp: str, bits0: torch.Tensor, params: Params) -> BaseGeometry:
        """bits0: int16 bf16 patterns [m, n] of the base tensor -> its BaseGeometry."""
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


#: the tensors-table columns the geometry stage fills: RunGeometry's and UpdateGeometry's
#: scalar fields
_NOT_COLUMNS = ("sigma_run", "sigma_run_all", "angle_left", "angle_right")
_RUN_COLUMNS = [f.name for f in fields(RunGeometry) if f.name not in _NOT_COLUMNS]
ROW_COLUMNS = _RUN_COLUMNS + [f.name for f in fields(UpdateGeometry)]


def row_columns(g: RunGeometry, update: UpdateGeometry) -> dict:
    """The tensors-table columns of one run's geometry (filled whatever its status)."""
    return {**{n: getattr(g, n) for n in _RUN_COLUMNS}, **asdict(update)}


def spectra_rows(
    scan_id: str,
    group: str,
    run: str,
    tensor: str,
    base: BaseGeometry,
    g: RunGeometry,
    full: bool = False,
) -> pa.Table:
    """Spectra rows: i-th largest singular value of base and run; i-th largest angles. i < k,
    or every i < min(rows, cols) when ``full`` (angles null from i = k on)."""
    k = g.spectral_k
    n = base.sigma.numel() if full else k
    pad = [None] * (n - k)
    return pa.table(
        {
            "scan_id": [scan_id] * n,
            "group_name": [group] * n,
            "run": [run] * n,
            "tensor": [tensor] * n,
            "i": pa.array(range(n), pa.int32()),
            "sigma_base": base.sigma[:n].cpu().numpy(),
            "sigma_run": g.sigma_run_all[:n].cpu().numpy(),
            "angle_left": pa.array(g.angle_left.cpu().tolist() + pad, pa.float64()),
            "angle_right": pa.array(g.angle_right.cpu().tolist() + pad, pa.float64()),
        }
    )
