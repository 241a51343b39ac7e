"""Rank and direction of a fine-tuning update dW = W1 - W0.

Pure torch, device-agnostic. For base W0 [m, n] and run W1 (bf16 values, so dW is exact in
float64), with s the singular values of dW (descending, p = min(m, n)):

- update_rank: numerical rank, numpy's ``matrix_rank`` default: #{s_i > s_1 * max(m, n) * eps},
  eps = float64 machine epsilon (2.2e-16); 0 for dW = 0;
- update_stable_rank: ||dW||_F^2 / ||dW||_2^2 = sum s_i^2 / s_1^2 (in [1, p]);
- update_effective_rank: exp(-sum p_i log p_i), p_i = s_i / sum s (Roy & Vetterli 2007; 0 log 0
  = 0; in [1, p]);
- update_energy_left, update_energy_right: ||U_k^T dW||_F^2 / ||dW||_F^2 and
  ||dW V_k||_F^2 / ||dW||_F^2, the share of the update's energy inside the base's top-k left
  (right) singular subspace (k = spectral_k); an update with no preferred direction puts k / m
  (k / n) there.
The ratios are NaN when dW = 0.

s comes from `update_singular_values`, a certified hybrid. The cheap route is the Gram: the
half-Gram G = dW^T dW on the short side (`rlvr_ray.stats.spectral.gram`) and ``eigvalsh``,
several times cheaper than ``svdvals`` of dW (README, "Performance and accuracy"). It resolves
singular values only down to ~sqrt(delta) (below), so it cannot tell an exactly low-rank update
from a full-rank one; but it can prove that an update is full rank. Every computed eigenvalue is
within delta of the exact one (Weyl), delta = gamma_M || |dW| ||_2^2 + c p u ||fl(G)||_2,
u = eps / 2:

- forming G: |fl(G) - G| <= gamma_M |dW|^T |dW| elementwise (a dot product of M terms in any
  order, gamma_M = M u / (1 - M u)), so ||fl(G) - G||_2 <= gamma_M || |dW| ||_2^2 (monotone on
  nonnegative matrices) <= gamma_M min(||dW||_F^2, ||dW||_1 ||dW||_inf); the second is 0.4x
  the first on an RL-like update, 0.7x on an SFT-like one (|dW| is close to rank one);
- ``eigvalsh``: backward stable, exact eigenvalues of fl(G) + F with ||F||_2 <= c p u ||fl(G)||_2
  (LAPACK Users' Guide 4.7: a "modestly growing function" of p times eps); c = 16
  (EIG_BACKWARD): 16 sqrt(p) times the ~sqrt(p) u ||G||_2 Householder reductions show.

If the smallest eigenvalue minus delta exceeds (2 tol)^2, tol = numpy's tolerance with s_1
bounded from above by sqrt(lambda_1 + delta), every singular value is provably above tol with a
margin (the factor 2) for an SVD's own error, which is of tol's size: the update is full rank,
and the ranks come from sigma = sqrt(lambda), each within a certified
`UpdateSpectrum.sigma_error` of the exact s_i (`rank_error_bounds` carries it to the stable and
effective ranks). Otherwise (a low-rank or ill-conditioned update: the Gram cannot decide) the
values come from one float64 ``svdvals`` of dW (LAPACK gesdd, values only). Both routes, their
costs and the bounds at real layer shapes: benchmarks/update_rank.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr_ray.stats.spectral import BaseGeometry, gram

EPS = torch.finfo(torch.float64).eps
UNIT_ROUNDOFF = EPS / 2
EIG_BACKWARD = 16.0  # c in the symmetric eigensolver's backward error c * p * u * ||G||_2
RANK_MARGIN = 2.0  # the smallest singular value must clear this times numpy's tolerance
METHODS = ("hybrid", "svdvals")


def numerical_rank(sigma: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values [p] of a matrix of ``shape`` -> numpy ``matrix_rank``'s default count:
    #{sigma_i > max(sigma) * max(shape) * eps(float64)}."""
    if sigma.numel() == 0:
        return 0
    tol = float(sigma.max()) * max(shape) * EPS
    return int((sigma > tol).sum())


def effective_rank(sigma: torch.Tensor) -> float:
    """Singular values [p] -> exp(entropy of p_i = sigma_i / sum sigma) (NaN for a zero matrix)."""
    s = sigma.to(torch.float64).clamp(min=0.0)
    total = float(s.sum())
    if not total > 0:
        return math.nan
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term float64 sum."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


@dataclass(frozen=True)
class UpdateSpectrum:
    """The singular values of dW and the route that produced them (see the module docstring).

    sigma: float64 [p], descending. route: 'gram' (certified full rank: sqrt of the Gram's
    eigenvalues), 'svd' (``svdvals``: the Gram could not certify) or 'zero' (dW = 0). delta:
    bound on the absolute error of every Gram eigenvalue (NaN unless route 'gram').
    """

    sigma: torch.Tensor
    route: str
    delta: float

    def sigma_error(self) -> torch.Tensor:
        """float64 [p]: bound on |sigma_i - s_i| for route 'gram' (s_i^2 lies within delta of
        sigma_i^2 > delta, and sqrt is concave): sigma_i - sqrt(sigma_i^2 - delta); zeros for
        'zero'; NaN for 'svd' (LAPACK's own accuracy)."""
        if self.route == "svd":
            return torch.full_like(self.sigma, math.nan)
        if self.route == "zero":
            return torch.zeros_like(self.sigma)
        return self.sigma - (self.sigma.square() - self.delta).clamp(min=0.0).sqrt()


def gram_eigenvalues(tall: torch.Tensor, energy: float) -> tuple[torch.Tensor, float, bool]:
    """dW in its tall frame, float64 [M, p] (M >= p), and its computed ||dW||_F^2 > 0 ->
    (eigenvalues [p] of fl(dW^T dW), descending; delta, the bound on each one's absolute
    error; whether they prove that dW is full rank by numpy's tolerance, with RANK_MARGIN)."""
    m, p = tall.shape
    lam = torch.linalg.eigvalsh(gram(tall)).flip(0)
    lam_top, lam_bottom = float(lam[0]), float(lam[-1])
    eig_backward = EIG_BACKWARD * p * UNIT_ROUNDOFF
    g_norm = max(abs(lam_top), abs(lam_bottom)) / (1 - eig_backward)  # >= ||fl(G)||_2
    frob2 = energy / (1 - _gamma(m * p))  # >= the exact ||dW||_F^2
    col_sum = float(torch.linalg.vector_norm(tall, 1, dim=0).max())  # ||dW||_1, no |dW| copy
    row_sum = float(torch.linalg.vector_norm(tall, 1, dim=1).max())  # ||dW||_inf
    norm1_inf = col_sum * row_sum / (1 - _gamma(m)) / (1 - _gamma(p))  # >= ||dW||_1 ||dW||_inf
    # the factor 1 + 1e-6 covers the rounding of delta's own arithmetic
    delta = (_gamma(m) * min(frob2, norm1_inf) + eig_backward * g_norm) * (1 + 1e-6)
    tol = RANK_MARGIN * math.sqrt(lam_top + delta) * m * EPS
    return lam, delta, lam_bottom - delta > tol * tol


#: the Gram route is tried only for a dW at least this much longer than wide
GRAM_MIN_ASPECT = 1.5


def update_singular_values(tall: torch.Tensor, energy: float) -> UpdateSpectrum:
    """dW in its tall frame, float64 [M, p] (M >= p), and its computed ||dW||_F^2 ->
    UpdateSpectrum: the Gram route when it certifies full rank, else ``svdvals``.

    A square-ish dW (M < GRAM_MIN_ASPECT p) goes to ``svdvals`` at once: a dense square
    matrix's smallest singular value has no floor (a random one's is ~s_1 / p or smaller, often
    below the Gram's resolution), so its Gram would mostly be wasted. A random tall one's is
    ~(sqrt(M) - sqrt(p)) / (sqrt(M) + sqrt(p)) s_1, far above it."""
    if energy == 0:
        zero = torch.zeros(tall.shape[1], dtype=torch.float64, device=tall.device)
        return UpdateSpectrum(zero, "zero", 0.0)
    if tall.shape[0] < GRAM_MIN_ASPECT * tall.shape[1]:
        return UpdateSpectrum(torch.linalg.svdvals(tall), "svd", math.nan)
    lam, delta, certified = gram_eigenvalues(tall, energy)
    if certified:
        return UpdateSpectrum(lam.clamp(min=0.0).sqrt(), "gram", delta)
    return UpdateSpectrum(torch.linalg.svdvals(tall), "svd", math.nan)


def rank_error_bounds(spectrum: UpdateSpectrum, energy: float, m: int) -> tuple[float, float]:
    """UpdateSpectrum of a route-'gram' dW [m, p] and its computed ||dW||_F^2 -> bounds on the
    relative error of (update_stable_rank, update_effective_rank); (0, 0) for 'zero', NaN for
    'svd'.

    Stable rank ||dW||_F^2 / sigma_1^2: the sum's gamma_{mp} and sigma_1^2's delta. Effective
    rank exp(H): by the mean value theorem on the segment from the computed to the exact values,
    |dH| <= sum_j max |dH/ds_j| e_j, with dH/ds_j = -(log(s_j / S) + H) / S, S = sum s, H in
    [0, log p], s_j / S >= (sigma_j - e_j) / (S + sum e) and S >= sum sigma - sum e.
    """
    if spectrum.route != "gram":
        return (0.0, 0.0) if spectrum.route == "zero" else (math.nan, math.nan)
    s, e = spectrum.sigma, spectrum.sigma_error()
    p = s.numel()
    gamma, lam_top = _gamma(m * p), float(s[0]) ** 2
    stable = (1 + gamma) * lam_top / (lam_top - spectrum.delta) - 1
    total, spread = float(s.sum()), float(e.sum())
    share_low = (s - e) / (total + spread)
    slope = torch.maximum(-share_low.log(), torch.full_like(s, math.log(p)))
    dh = float((slope * e).sum()) / (total - spread)
    return stable, math.expm1(dh)


@dataclass(frozen=True)
class UpdateGeometry:
    """Rank and direction of dW = W1 - W0 (see the module docstring); ratios NaN for dW = 0."""

    update_rank: int
    update_stable_rank: float
    update_effective_rank: float
    update_energy_left: float
    update_energy_right: float


def update_geometry(
    base: BaseGeometry, w0: torch.Tensor, w1: torch.Tensor, method: str = "hybrid"
) -> UpdateGeometry:
    """BaseGeometry of W0, W0 and W1 [m, n] (bf16 or any float dtype) -> UpdateGeometry,
    computed in float64 on the base's device; the top-k subspaces are the base's cached ones.

    method: 'hybrid' (`update_singular_values`: the certified Gram route, else ``svdvals``) or
    'svdvals' (always ``svdvals``; the reference the benchmark compares against)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tuple(w0.shape) != base.shape or tuple(w1.shape) != base.shape:
        raise ValueError(
            f"shape mismatch: base {base.shape}, W0 {tuple(w0.shape)}, W1 {tuple(w1.shape)}"
        )
    device, k = base.sigma.device, base.spectral_k
    dw = w1.to(device, torch.float64) - w0.to(device, torch.float64)
    tall = dw.T if base.transposed else dw
    energy = float(tall.square().sum())
    if not math.isfinite(energy):
        raise ValueError("update W1 - W0 has NaN or Inf entries")
    if method == "hybrid":
        sigma = update_singular_values(tall, energy).sigma
    else:
        sigma = torch.linalg.svdvals(tall)
    if energy > 0:
        tall_left = float((base.u.T @ tall).square().sum()) / energy
        tall_right = float((tall @ base.v[:, :k]).square().sum()) / energy
    else:
        tall_left = tall_right = math.nan
    left, right = (tall_right, tall_left) if base.transposed else (tall_left, tall_right)
    return UpdateGeometry(
        update_rank=numerical_rank(sigma, tuple(dw.shape)),
        update_stable_rank=energy / float(sigma[0]) ** 2 if energy > 0 else math.nan,
        update_effective_rank=effective_rank(sigma),
        update_energy_left=left,
        update_energy_right=right,
    )
