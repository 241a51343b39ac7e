"""Benchmark: the extra per-run cost of the update-rank statistics at Qwen2.5-1.5B shapes.

Per shape (q/o 1536x1536, k/v 256x1536, gate/up 8960x1536, down 1536x8960): a power-law bf16
base, one RL-like run (1-3 bf16 ULPs on ~40% of the entries), then the time of
``run_geometry`` (today's per-run geometry: Gram + eigh of W1, top-k subspaces, angles), of
``update_geometry`` (float64 ``svdvals`` of dW plus the energy shares) and of the Gram route
(dW^T dW on the short side + ``eigvalsh``), with the largest relative error of the Gram route's
singular values against ``svdvals`` and the ranks each route gives on the RL-like update and on
a planted rank-7 update (numpy's ``matrix_rank`` tolerance). One thread (``--threads``): shared,
loaded cores make multi-threaded timings erratic.

Run (CPU, a few minutes; ~6 on 2 loaded cores):
    .venv/bin/python benchmarks/update_rank.py
GPU: add ``--device cuda``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.geometry import powerlaw_bf16, ulp_update
from rlvr_ray.stats.spectral import base_geometry, run_geometry
from rlvr_ray.stats.update import numerical_rank, update_geometry

SHAPES = {
    "q_proj": (1536, 1536),
    "k_proj": (256, 1536),
    "gate_proj": (8960, 1536),
    "down_proj": (1536, 8960),
}


def best_of(n: int, fn, *args) -> tuple[float, object]:
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), out


def gram_sigma(dw: torch.Tensor) -> torch.Tensor:
    tall = dw.T if dw.shape[0] < dw.shape[1] else dw
    return torch.linalg.eigvalsh(tall.T @ tall).flip(0).clamp(min=0).sqrt()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    total_geo = total_upd = total_gram = 0.0
    print(
        f"{'tensor':10} {'shape':>11} {'run_geo s':>9} {'update s':>9} {'ratio':>6} "
        f"{'gram s':>7} {'gram err':>9} {'rank svd/gram':>14} {'rank-7 svd/gram':>16}"
    )
    for name, shape in SHAPES.items():
        w0 = powerlaw_bf16(*shape, gen)
        w1 = ulp_update(w0, gen)
        dev = args.device
        base = base_geometry(w0.to(dev))  # default relative k: 64 at p = 1536
        mask = (w0.view(torch.int16) != w1.view(torch.int16)).to(dev)
        t_geo, _ = best_of(args.repeat, run_geometry, base, w1.to(dev), mask)
        t_upd, _ = best_of(args.repeat, update_geometry, base, w0.to(dev), w1.to(dev))
        dw = w1.to(dev, torch.float64) - w0.to(dev, torch.float64)
        t_gram, s_gram = best_of(args.repeat, gram_sigma, dw)
        s = torch.linalg.svdvals(dw)
        err = float(((s_gram - s).abs() / s).max())
        a = torch.randint(-3, 4, (shape[0], 7), generator=gen, dtype=torch.float64)
        b = torch.randint(-3, 4, (7, shape[1]), generator=gen, dtype=torch.float64)
        low = (a @ b).to(dev)
        r7 = (
            numerical_rank(torch.linalg.svdvals(low), shape),
            numerical_rank(gram_sigma(low), shape),
        )
        ranks = (numerical_rank(s, shape), numerical_rank(s_gram, shape))
        total_geo, total_upd, total_gram = total_geo + t_geo, total_upd + t_upd, total_gram + t_gram
        print(
            f"{name:10} {str(shape[0]) + 'x' + str(shape[1]):>11} {t_geo:9.2f} {t_upd:9.2f} "
            f"{t_upd / t_geo:6.2f} {t_gram:7.2f} {err:9.1e} {str(ranks):>14} {str(r7):>16}"
        )
    print(
        f"{'total':10} {'':>11} {total_geo:9.2f} {total_upd:9.2f} {total_upd / total_geo:6.2f} "
        f"{total_gram:7.2f}"
    )


if __name__ == "__main__":
    main()
