"""Spectral geometry of a fine-tuning update: normalized spectral shift and principal angles.

Pure torch, device-agnostic (inputs on CUDA compute on CUDA). For base W0 [m, n] and run W1:

- NSS = ||sigma(W1) - sigma(W0)||_2 / ||sigma(W0)||_2 over all min(m, n) singular values;
- principal angles between the top-k left singular subspaces of W0 and W1, and between the
  right ones (k = spectral_k, clipped), returned in descending order (largest first, like
  ``scipy.linalg.subspace_angles``); small angles come from sines, never from arccos near 1.

RL moves weights by 1-3 bf16 ULPs, so the signal is a relative change of ~1e-5 in sigma and
angles down to 1e-6 rad. Everything below is float64, and the work is split so that a base is
decomposed once (`base_geometry`) and each run reuses it (`run_geometry`). Work in the frame
where the matrix is tall (transpose if m < n), p = min(m, n), k = spectral_k:

- NSS needs every singular value of W1, exactly: they come from ``eigvalsh`` (values only) of
  the Gram W1^T W1, whose lower triangle is multiplied a block at a time (`gram`: ~0.56 of a
  gemm's flops). The Gram squares the condition number: sigma_i carries an absolute error of
  ~eps * sigma_max^2 / sigma_i, harmless for trained weights (sigma_max / sigma_i < 1e3), not
  for near-singular matrices. Gram + ``eigvalsh`` is the floor of a run's cost: no identity
  gives sum_i sigma_i(W0) sigma_i(W1) from the base's decomposition, and a bound from the top-k
  values alone (Mirsky: ||sigma(W1) - sigma(W0)|| <= ||W1 - W0||_F) is 20-60x the RL signal.
- The top-k right subspace of W1 comes from `top_subspace`: block LOBPCG on the Gram, started
  at the base's top right singular vectors (RL rotates them by ~1e-2 rad), O(p^2 k) a step, until
  the Davis-Kahan bound ||sin Theta|| <= ||G Q - Q Theta||_F / (theta_k - lambda_{k+1}) (exact
  lambda_{k+1} from ``eigvalsh``) is below 2e-3 of the largest angle; a full ``eigh`` with
  vectors when it cannot certify (a near-tie at k, or a stagnating bound).
- Top-k left subspace of W1 = span(W1 Q) (one m x p x k gemm and a QR); its error is at most
  the right one times sigma_{k+1} / sigma_k (in tangent), so asin of the bound covers every
  angle on both sides (principal angles are 1-Lipschitz in the subspace): `angle_error_bound`.
- sigma_max and the stable rank ||W||_F^2 / sigma_max^2 of W0 and W1 come from the same
  eigenvalues.
- The base: Gram, ``eigvalsh`` (the run's routine, so an unchanged run's NSS is exactly 0) and
  one ``eigh`` with vectors, of which only the top seed_width(p, k) = k + max(k / 2, 8) right
  vectors are kept (the LOBPCG's start), not all p.

Whether the geometry means anything (``geometry_status``): a top-k subspace is only a finding
when k is well below the rank and separated from the rest of the spectrum. With p = min(m, n):

- 'k_not_below_rank' when rank_k or spectral_k exceeds p / 4 (MAX_K_SHARE): at k = p the top-k
  subspace is the whole space (every angle is 0 for any update) and W0_k = W0, so M_princ is
  the exact complement of M_low; well below p the paper's k = 64 on 1.5k-4k-wide matrices sits
  at 1.5-4% of p;
- 'small_gap' when the relative gap (sigma_k - sigma_{k+1}) / sigma_k at rank_k or at
  spectral_k (the smaller of the two is ``sigma_gap``; sigma_{p+1} = 0) is below MIN_SIGMA_GAP
  = 1e-3: by Wedin's theorem an update moves the top-k subspace by up to ||W1 - W0||_2 /
  (sigma_k - sigma_{k+1}), so when sigma_k and sigma_{k+1} are within 0.1% an RL update of
  1e-4..1e-3 of sigma_k can swap the k-th and (k+1)-th directions: the angles then measure a
  reordering, not a rotation, and W0_k (so M_princ) is not fixed by the base to that precision;
- 'ok' otherwise. The statistics are computed either way; the views present only 'ok' ones.

Accuracy against float64 ``torch.linalg.svd`` of the decoded bf16 values and the sine formula
of ``scipy.linalg.subspace_angles``, and speed against the Gram + full ``eigh`` per run:
benchmarks/geometry.py (real layer shapes; figures in docs/performance.md).
tests/stats/test_spectral.py asserts the certified bound and NSS to 1e-6 on smaller shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rlvr_ray.stats.principal import (
    low_magnitude_mask,
    mask_overlaps,
    rank_for,
    top_fraction_mask,
)

_RTOL = 2e-3  # certified angle error target, relative to the largest angle
_ATOL = 1e-10  # ... or absolute, in rad
_FLOOR = 64.0  # rounding-floor multiple (of eps * sqrt(p) * lambda_max) counted as converged
_SHRINK = 0.8  # each LOBPCG step must shrink the bound this much, or eigh takes over
_MAX_STEPS = 30  # LOBPCG steps before eigh takes over
_MAX_UNSEPARATED = 3  # ... or steps whose k-th Ritz value is not above lambda_{k+1}
_GRAM_BLOCK = 512  # columns per block of the blocked Gram (lower triangle only)
MAX_K_SHARE = 0.25  # k above this share of min(m, n): 'k_not_below_rank'
MIN_SIGMA_GAP = 1e-3  # relative singular-value gap at k below this: 'small_gap'
METHODS = ("krylov", "eigh")


def _oriented(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Matrix [m, n] -> (float64 view [max(m, n), min(m, n)], transposed?)."""
    w = w.to(torch.float64)
    return (w.T, True) if w.shape[0] < w.shape[1] else (w, False)


def gram(w: torch.Tensor) -> torch.Tensor:
    """float64 [M, p] -> W^T W [p, p]. On a CPU only the lower triangle is multiplied, a block
    of columns at a time (a SYRK in torch: ~0.56 of the gemm's flops at p = 4096), and mirrored;
    elsewhere one gemm."""
    p = w.shape[1]
    if w.device.type != "cpu" or p <= _GRAM_BLOCK:
        return w.T @ w
    g = torch.empty(p, p, dtype=w.dtype, device=w.device)
    for a in range(0, p, _GRAM_BLOCK):
        b = min(a + _GRAM_BLOCK, p)
        block = w[:, a:].T @ w[:, a:b]  # rows a.., columns a..b
        g[a:, a:b] = block
        g[a:b, b:] = block[b - a :].T
    return g


def _eig_desc(g: torch.Tensor, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric [p, p] float64 -> (eigenvalues [p] descending, eigenvectors [p, p] or None)."""
    if vectors:
        lam, v = torch.linalg.eigh(g)
        return lam.flip(0), v.flip(1).contiguous()
    return torch.linalg.eigvalsh(g).flip(0), None


def _sqrt_clamped(lam: torch.Tensor) -> torch.Tensor:
    return lam.clamp(min=0.0).sqrt()


def principal_angles(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Orthonormal bases qa, qb [n, k] -> float64 angles [k] between their spans, descending.

    Angles up to pi/4 are asin of the singular values of qb - qa (qa^T qb) (the component of
    span(qb) orthogonal to span(qa)); larger ones are acos of the singular values of qa^T qb.
    """
    if qa.shape != qb.shape:
        raise ValueError(f"bases must have the same shape, got {qa.shape} and {qb.shape}")
    c = qa.T @ qb
    cos = torch.linalg.svdvals(c).flip(0)  # ascending cosines = descending angles
    sin = torch.linalg.svdvals(qb - qa @ c)  # descending
    from_sin = torch.asin(sin.clamp(max=1.0))
    from_cos = torch.acos(cos.clamp(-1.0, 1.0))
    return torch.where(sin * sin <= 0.5, from_sin, from_cos)


def normalized_spectral_shift(sigma0: torch.Tensor, sigma1: torch.Tensor) -> float:
    """Singular values [p] (descending) of W0 and W1 -> ||s1 - s0||_2 / ||s0||_2 (NaN if s0 = 0)."""
    s0, s1 = sigma0.to(torch.float64), sigma1.to(torch.float64)
    norm0 = float(torch.linalg.vector_norm(s0))
    return float(torch.linalg.vector_norm(s1 - s0)) / norm0 if norm0 > 0 else math.nan


def _max_sine(q: torch.Tensor, v_k: torch.Tensor) -> float:
    """Orthonormal [p, k] x2 -> sine of the largest principal angle between the spans."""
    return float(torch.linalg.matrix_norm(q - v_k @ (v_k.T @ q), ord=2))


def _ritz(
    s: torch.Tensor, gs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on span(s) [p, d] with gs = G s -> (Ritz vectors [p, k], values [k], R)."""
    h = s.T @ gs
    theta, y = _eig_desc((h + h.T) / 2, vectors=True)
    theta, y = theta[:k], y[:, :k]
    q = s @ y
    return q, theta, gs @ y - q * theta


def seed_width(p: int, k: int) -> int:
    """How many of the base's top right singular vectors a run's iteration starts from."""
    return min(p, k + max(k // 2, 8))


def _orthogonal(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of t [p, j] with span(s) [p, d] (orthonormal) projected out, twice:
    classical Gram-Schmidt once is not enough."""
    for _ in range(2):
        t = torch.linalg.qr(t - s @ (s.T @ t)).Q
    return t


def top_subspace(
    g: torch.Tensor, lam: torch.Tensor, v0: torch.Tensor, k: int
) -> tuple[torch.Tensor, float]:
    """Top-k eigenvectors of a Gram matrix near a known one, with a certified error bound.

    g: W1^T W1 [p, p] float64; lam: its eigenvalues [p], descending (``eigvalsh``); v0:
    orthonormal [p, d >= k], the base's top-d right singular vectors. Returns (q [p, k]
    orthonormal basis, bound on the sine of the largest angle between span(q) and the exact
    top-k eigenspace of g).

    Block LOBPCG without preconditioner, warm-started at v0: Rayleigh-Ritz on span(X, R, P)
    (X the top-d Ritz vectors, R the residuals of the top k, P the previous R), O(p^2 k) a step,
    until the Davis-Kahan bound ||G q - q Theta||_F / (theta_k - lam_{k+1}) is below 2e-3 of the
    largest angle to span(v0[:, :k]) (or 1e-10 rad, or the rounding floor); one ``eigh`` of g
    when k >= p / 4, when the gap at k is zero, or when the bound stops shrinking (a large,
    SFT-like update can take that path).
    """
    p, d = g.shape[0], v0.shape[1]
    gap = float(lam[k - 1] - lam[k]) if k < p else 0.0
    floor = _FLOOR * torch.finfo(torch.float64).eps * math.sqrt(p) * float(lam[0])
    if d + 2 * k <= p and gap > 0:
        s = torch.linalg.qr(v0).Q
        gs, previous, steps, pr = g @ s, math.inf, 0, None
        while True:
            h = s.T @ gs
            theta, y = _eig_desc((h + h.T) / 2, vectors=True)
            x, gx = s @ y[:, :d], gs @ y[:, :d]
            q, res = x[:, :k], gx[:, :k] - x[:, :k] * theta[:k]
            res_norm = float(torch.linalg.matrix_norm(res))
            sep = float(theta[k - 1] - lam[k]) - floor  # lam carries ~floor of rounding
            bound = res_norm / sep if sep > 0 else math.inf
            target = max(_RTOL * _max_sine(q, v0[:, :k]), _ATOL)
            if bound <= target or (sep > 0.5 * gap and res_norm <= floor):
                return q, bound
            steps += 1
            if steps > _MAX_STEPS or (bound == math.inf and steps > _MAX_UNSEPARATED):
                break  # no separation from the rest of the spectrum in sight
            if math.isfinite(previous) and not bound < _SHRINK * previous:
                break  # stagnating
            previous = bound
            r = _orthogonal(res, x)
            blocks, gblocks = [x, r], [gx, g @ r]
            if pr is not None:
                pr = _orthogonal(pr, torch.cat([x, r], 1))
                blocks.append(pr)
                gblocks.append(g @ pr)
            pr = r
            s, gs = torch.cat(blocks, 1), torch.cat(gblocks, 1)
    return eigh_top_subspace(g, k)[1:]


def eigh_top_subspace(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Gram [p, p] float64 -> (eigenvalues [p] descending, top-k eigenvectors [p, k], the
    Davis-Kahan bound on the sine of their largest angle to the exact subspace)."""
    lam, v = _eig_desc(g, vectors=True)
    q = v[:, :k]
    if k >= g.shape[0]:
        return lam, q, 0.0
    gap = float(lam[k - 1] - lam[k])
    res_norm = float(torch.linalg.matrix_norm(g @ q - q * lam[:k]))
    return lam, q, res_norm / gap if gap > 0 else math.inf


def relative_gap(sigma: torch.Tensor, k: int) -> float:
    """Singular values [p] (descending) -> (sigma_k - sigma_{k+1}) / sigma_k, 1-based k in
    [1, p], sigma_{p+1} = 0; 0.0 when sigma_k = 0 (no top-k subspace to speak of)."""
    top = float(sigma[k - 1])
    nxt = float(sigma[k]) if k < sigma.numel() else 0.0
    return (top - nxt) / top if top > 0 else 0.0


def geometry_status(sigma: torch.Tensor, rank_k: int, spectral_k: int) -> tuple[str, float]:
    """Singular values [p] (descending) of W0 and the two k -> (status, sigma_gap).

    status: 'k_not_below_rank' if max(rank_k, spectral_k) > MAX_K_SHARE * p, else 'small_gap'
    if sigma_gap < MIN_SIGMA_GAP, else 'ok'; sigma_gap is the smaller relative gap at the two k.
    """
    p = sigma.numel()
    gap = min(relative_gap(sigma, rank_k), relative_gap(sigma, spectral_k))
    if max(rank_k, spectral_k) > MAX_K_SHARE * p:
        return "k_not_below_rank", gap
    if not gap >= MIN_SIGMA_GAP:
        return "small_gap", gap
    return "ok", gap


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """BoolTensor [m, n] -> uint8 [ceil(m n / 8)], 8 elements a byte (row-major, MSB first)."""
    return torch.from_numpy(np.packbits(mask.cpu().contiguous().numpy().reshape(-1)))


def _unpack(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `_pack`."""
    n = shape[0] * shape[1]
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).view(np.bool_).reshape(shape))


def cache_bytes(d: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors of a `BaseGeometry.to_tensors` dict."""
    return sum(t.numel() * t.element_size() for t in d.values())


@dataclass(frozen=True)
class BaseGeometry:
    """What per-run work needs from a base tensor W0 [m, n], decomposed once (p = min(m, n)).

    Spectral fields live in the tall frame (W0 itself, or W0^T when m < n: `transposed`).
    sigma: float64 [p] all singular values, descending. v: float64 [p, seed_width(p,
    spectral_k)] the top right singular vectors of the tall frame (columns by descending sigma;
    a run's iteration starts from them). u: float64 [max(m, n), spectral_k] orthonormal basis of
    the top left singular subspace of the tall frame. princ_mask, low_mask: BoolTensor [m, n]
    (original frame). Serialized (`to_tensors`) the masks take one bit an element, so a cache
    entry is a fraction of the base's own bf16 bytes (`cache_bytes`).
    """

    sigma: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    princ_mask: torch.Tensor
    low_mask: torch.Tensor
    rank_k: int
    spectral_k: int
    alpha: float
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.princ_mask.shape)

    @property
    def status(self) -> tuple[str, float]:
        """(geometry_status, sigma_gap) of this base at its rank_k and spectral_k."""
        return geometry_status(self.sigma, self.rank_k, self.spectral_k)

    @property
    def sigma_base(self) -> torch.Tensor:
        """float64 [spectral_k]: the top singular values of W0."""
        return self.sigma[: self.spectral_k]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict of CPU tensors (scalars as 0-d tensors, masks packed 8 to a byte), e.g.
        for a safetensors cache file."""
        return {
            "sigma": self.sigma.cpu().contiguous(),
            "v": self.v.cpu().contiguous(),
            "u": self.u.cpu().contiguous(),
            "princ_bits": _pack(self.princ_mask),
            "low_bits": _pack(self.low_mask),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "rank_k": torch.tensor(self.rank_k, dtype=torch.int64),
            "spectral_k": torch.tensor(self.spectral_k, dtype=torch.int64),
            "alpha": torch.tensor(self.alpha, dtype=torch.float64),
            "transposed": torch.tensor(self.transposed, dtype=torch.bool),
        }

    @classmethod
    def from_tensors(
        cls, d: dict[str, torch.Tensor], device: str | torch.device = "cpu"
    ) -> BaseGeometry:
        """Inverse of `to_tensors`, on ``device``."""
        shape = tuple(int(x) for x in d["shape"])
        return cls(
            sigma=d["sigma"].to(device),
            v=d["v"].to(device),
            u=d["u"].to(device),
            princ_mask=_unpack(d["princ_bits"], shape).to(device),
            low_mask=_unpack(d["low_bits"], shape).to(device),
            rank_k=int(d["rank_k"]),
            spectral_k=int(d["spectral_k"]),
            alpha=float(d["alpha"]),
            transposed=bool(d["transposed"]),
        )


@dataclass(frozen=True)
class RunGeometry:
    """Geometry of one run against its base. Overlaps are NaN when the run changed nothing.

    sigma_run: float64 [spectral_k] top singular values of W1; angle_left, angle_right: float64
    [spectral_k] principal angles (rad, descending) between the top-spectral_k left (right)
    singular subspaces of W0 and W1; angle_error_bound: certified bound (rad) on the absolute
    error of every angle. geometry_status, sigma_gap: the base's (`geometry_status`); the
    other fields are filled whatever the status. sigma_max_*, stable_rank_*: spectral norm and
    ||W||_F^2 / sigma_max^2 of W0 and W1 (from all singular values); sigma_run_all: float64 [p]
    every singular value of W1, descending.
    """

    overlap_princ: float
    overlap_low: float
    overlap_princ_not_low: float
    princ_density: float
    low_density: float
    princ_not_low_density: float
    nss: float
    max_angle_left: float
    max_angle_right: float
    spectral_k: int
    rank_k: int
    sigma_run: torch.Tensor
    angle_left: torch.Tensor
    angle_right: torch.Tensor
    angle_error_bound: float
    geometry_status: str
    sigma_gap: float
    sigma_max_base: float
    sigma_max_run: float
    stable_rank_base: float
    stable_rank_run: float
    sigma_run_all: torch.Tensor


def stable_rank(sigma: torch.Tensor) -> float:
    """Singular values [p] -> sum sigma_i^2 / max(sigma)^2 (NaN for a zero matrix)."""
    s = sigma.to(torch.float64)
    top = float(s.max()) if s.numel() else 0.0
    return float(s.square().sum()) / (top * top) if top > 0 else math.nan


def _check_matrix(w: torch.Tensor, what: str) -> None:
    if w.ndim != 2 or w.numel() == 0:
        raise ValueError(f"{what} must be a non-empty matrix, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what} has NaN or Inf entries")


def base_geometry(
    w0: torch.Tensor, rank_k: int | None = None, alpha: float = 0.5, spectral_k: int | None = None
) -> BaseGeometry:
    """Base weights [m, n] (bf16 or any float dtype) -> BaseGeometry, on w0's device.

    rank_k and spectral_k: absolute k clipped to [1, min(m, n)], or None for the relative
    default (`rlvr_ray.stats.principal.rank_for`). Raises ValueError for a non-matrix
    (e.g. a 1-D norm vector) or non-finite weights.
    """
    _check_matrix(w0, "base tensor")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w, transposed = _oriented(w0)
    p = w.shape[1]
    rank_k, spectral_k = rank_for((p, p), rank_k), rank_for((p, p), spectral_k)
    g = gram(w)
    # the values from the same routine as a run's (``eigvalsh``), so an unchanged run's NSS is 0
    lam = _eig_desc(g, vectors=False)[0]
    v = _eig_desc(g, vectors=True)[1][:, : max(rank_k, seed_width(p, spectral_k))].contiguous()
    del g
    wv = w @ v[:, : max(rank_k, spectral_k)]  # columns u_i * sigma_i
    del w  # 8 bytes an element: freed before the masks' own full-size scratch
    u = torch.linalg.qr(wv[:, :spectral_k]).Q.contiguous()
    # W0_k in W0's own frame, contiguous: its |.| is taken in place and never copied
    a, b = wv[:, :rank_k], v[:, :rank_k]
    w0k = b @ a.T if transposed else a @ b.T
    princ = top_fraction_mask(w0k.abs_(), alpha)
    del w0k
    return BaseGeometry(
        sigma=_sqrt_clamped(lam),
        v=v[:, : seed_width(p, spectral_k)].contiguous(),
        u=u,
        princ_mask=princ,
        low_mask=low_magnitude_mask(w0, alpha),
        rank_k=rank_k,
        spectral_k=spectral_k,
        alpha=alpha,
        transposed=transposed,
    )


def run_geometry(
    base: BaseGeometry, w1: torch.Tensor, mask: torch.Tensor, method: str = "krylov"
) -> RunGeometry:
    """BaseGeometry, run weights W1 [m, n] (any float dtype), update mask M (BoolTensor [m, n])
    -> RunGeometry, computed on the base's device.

    method: 'krylov' (``eigvalsh`` of W1^T W1 plus `top_subspace`, certified, with its own
    fallback to ``eigh``) or 'eigh' (one full ``eigh`` of W1^T W1 with vectors).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if w1.ndim != 2 or tuple(w1.shape) != base.shape or tuple(mask.shape) != base.shape:
        raise ValueError(
            f"shape mismatch: base {base.shape}, run {tuple(w1.shape)}, mask {tuple(mask.shape)}"
        )
    device, k = base.sigma.device, base.spectral_k
    w, _ = _oriented(w1.to(device))
    g = gram(w)
    if not bool(torch.isfinite(g.diagonal()).all()):  # column sums of squares: any NaN/Inf
        raise ValueError("run tensor has NaN or Inf entries (or overflows float64 squares)")
    if method == "krylov":
        lam, _ = _eig_desc(g, vectors=False)
        q, bound = top_subspace(g, lam, base.v, k)
    else:
        lam, q, bound = eigh_top_subspace(g, k)
    sigma = _sqrt_clamped(lam)
    u1 = torch.linalg.qr(w @ q).Q
    tall_right = principal_angles(base.v[:, :k], q)
    tall_left = principal_angles(base.u, u1)
    right, left = (tall_left, tall_right) if base.transposed else (tall_right, tall_left)
    status, gap = base.status
    return RunGeometry(
        **mask_overlaps(base.princ_mask, base.low_mask, mask.to(device)),
        nss=normalized_spectral_shift(base.sigma, sigma),
        max_angle_left=float(left[0]),
        max_angle_right=float(right[0]),
        spectral_k=k,
        rank_k=base.rank_k,
        sigma_run=sigma[:k],
        angle_left=left,
        angle_right=right,
        angle_error_bound=math.asin(min(bound, 1.0)),
        geometry_status=status,
        sigma_gap=gap,
        sigma_max_base=float(base.sigma[0]),
        sigma_max_run=float(sigma[0]),
        stable_rank_base=stable_rank(base.sigma),
        stable_rank_run=stable_rank(sigma),
        sigma_run_all=sigma,
    )
