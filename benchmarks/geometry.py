"""Benchmark: base-once geometry statistics vs the straightforward float64 SVD per (base, run).

Builds synthetic bf16 weights at the Qwen2-0.5B shapes (q/o 896x896, k/v 128x896, gate/up
4864x896, down 896x4864) with power-law spectra, 4 RL-like runs (1-3 bf16 ULPs on ~40% of the
entries) and optionally one SFT-like run (timed apart), then prints per tensor and in total:

- straightforward: float64 ``torch.linalg.svd`` of base and run for every (base, run) pair;
- ours: ``base_geometry`` once per tensor + ``run_geometry`` per run, split into the two;
- the max relative errors of NSS and of the max left/right angles against a float64 reference
  (full SVD of the decoded bf16 values, angles from the SVD vectors with the stable sine formula
  of ``scipy.linalg.subspace_angles``).

Which orientation MKL's float64 ``svd`` prefers for a tall row-major matrix depends on the
threading: on 2 loaded cores 4864x896 took 22 s as stored and 1.4 s transposed, single-threaded
0.9 s and 4 s. So the straightforward time is reported as stored ("naive", one SVD timed per
shape and multiplied by the number of SVDs of that shape: the time depends on the shape, not
the values), with tall matrices transposed ("naive-T", measured for every pair, interleaved
with ours; it also gives the reference values), and as the fastest per shape of those and
one timed SVD of the transposed view ("best"). Timings default to one thread (``--threads``), because two MKL threads on cores
shared with other jobs made every timing 10-30x slower and erratic.

Run (CPU, ~3 minutes; ~1 minute of it ours and the straightforward method each):
    .venv/bin/python benchmarks/geometry.py --layers 1
    .venv/bin/python benchmarks/geometry.py --layers 2 --sft   # plus one SFT-like run
GPU: add ``--device cuda`` (the reference stays on CPU float64).
"""

from __future__ import annotations

import argparse
import time

import torch

from rlvr_ray.stats.spectral import base_geometry, normalized_spectral_shift, run_geometry

SHAPES = {  # Qwen2-0.5B: hidden 896, intermediate 4864, 14 heads, 2 kv heads x 64
    "q_proj": (896, 896),
    "k_proj": (128, 896),
    "v_proj": (128, 896),
    "o_proj": (896, 896),
    "gate_proj": (4864, 896),
    "up_proj": (4864, 896),
    "down_proj": (896, 4864),
}


def powerlaw_bf16(m: int, n: int, gen: torch.Generator, exponent: float = 0.6) -> torch.Tensor:
    """Random bf16 [m, n] with singular values ~ (i + 1)^-exponent plus a 5% flat bulk."""
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64)).Q
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -exponent + 0.05
    w = (u * s) @ v.T
    return (w * (0.02 / w.pow(2).mean().sqrt())).to(torch.bfloat16)


def ulp_update(w0: torch.Tensor, gen: torch.Generator, share: float = 0.4) -> torch.Tensor:
    """bf16 [m, n] -> bf16 [m, n] with `share` of the entries moved by +-1..3 ULPs."""
    bits = w0.view(torch.int16)
    pick = (torch.rand(w0.shape, generator=gen) < share) & ((bits & 0x7FFF) > 8)
    steps = torch.randint(1, 4, w0.shape, generator=gen, dtype=torch.int16)
    sign = torch.where(torch.rand(w0.shape, generator=gen) < 0.5, -1, 1).to(torch.int16)
    return torch.where(pick, bits + sign * steps, bits).view(torch.bfloat16)


def sft_update(w0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bf16 [m, n] -> bf16 [m, n] plus a dense update of ~30% of W0's rms."""
    noise = torch.randn(w0.shape, generator=gen, dtype=torch.float64) * 0.3 * 0.02
    return (w0.double() + noise).to(torch.bfloat16)


def reference(w0: torch.Tensor, w1: torch.Tensor, k: int) -> tuple[float, float, float]:
    """float64 SVD reference -> (nss, max angle left, max angle right)."""

    def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = w.double()
        if w.shape[0] > w.shape[1]:  # the faster MKL orientation
            u, s, vh = torch.linalg.svd(w.T, full_matrices=False)
            return vh.T, s, u.T
        return torch.linalg.svd(w, full_matrices=False)

    def max_angle(a: torch.Tensor, b: torch.Tensor) -> float:  # scipy's sine formula
        return float(torch.linalg.matrix_norm(b - a @ (a.T @ b), ord=2).clamp(max=1).asin())

    u0, s0, vh0 = svd(w0)
    u1, s1, vh1 = svd(w1)
    k = min(k, s0.numel())
    return (
        normalized_spectral_shift(s0, s1),
        max_angle(u0[:, :k], u1[:, :k]),
        max_angle(vh0[:k].T, vh1[:k].T),
    )


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def naive_svd_time(shape: tuple[int, int], transposed: bool = False) -> float:
    """Seconds of one float64 ``torch.linalg.svd`` of a row-major matrix of this shape (or of
    its transpose, a view: the same singular values, the other memory order)."""
    w = torch.randn(*shape, dtype=torch.float64)
    return timed(torch.linalg.svd, w.T if transposed else w, False)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (7 tensors each)")
    ap.add_argument("--runs", type=int, default=4, help="RL-like runs per base (default 4)")
    ap.add_argument("--sft", action="store_true", help="add one SFT-like run per base")
    ap.add_argument("--spectral-k", type=int, default=64, help="angle subspace rank (64)")
    ap.add_argument("--device", default="cpu", help="device for our method (default cpu)")
    ap.add_argument("--davidson", action="store_true", help="eigvalsh + Davidson, not eigh")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1; 0: default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    t_base = t_run = t_ref = t_sft = t_sft_ref = 0.0
    ref_by_shape: dict[tuple[int, int], float] = {}
    ours_by_shape: dict[tuple[int, int], float] = {}
    n_pairs: dict[tuple[int, int], int] = {}
    worst = {"rl": [0.0, 0.0, 0.0], "sft": [0.0, 0.0, 0.0]}
    print(
        f"{'tensor':<16}{'naive-T s':>10}{'ours s':>8}{'(base':>7}{'+ runs)':>8}{'ratio':>7}"
        f"{'last run: nss':>14}{'max_left':>10}{'max_right':>10}"
    )
    for layer in range(args.layers):
        for role, shape in SHAPES.items():
            w0 = powerlaw_bf16(*shape, gen)
            runs = [("rl", ulp_update(w0, gen)) for _ in range(args.runs)]
            runs += [("sft", sft_update(w0, gen))] if args.sft else []
            n_pairs[shape] = n_pairs.get(shape, 0) + args.runs
            base, tb = timed(base_geometry, w0.to(args.device), 64, 0.5, args.spectral_k)
            tr_sum = tref_sum = 0.0
            for kind, w1 in runs:  # interleaved, so load from other processes hits both alike
                mask = (w1.view(torch.int16) != w0.view(torch.int16)).to(args.device)
                out, tr = timed(run_geometry, base, w1.to(args.device), mask, args.davidson)
                ref, tref = timed(reference, w0, w1, args.spectral_k)
                if kind == "sft":
                    t_sft, t_sft_ref = t_sft + tr, t_sft_ref + tref
                else:
                    tr_sum, tref_sum = tr_sum + tr, tref_sum + tref
                ours = (out.nss, out.max_angle_left, out.max_angle_right)
                for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
                    worst[kind][i] = max(worst[kind][i], abs(a - b) / abs(b))
            t_base, t_run, t_ref = t_base + tb, t_run + tr_sum, t_ref + tref_sum
            ref_by_shape[shape] = ref_by_shape.get(shape, 0.0) + tref_sum
            ours_by_shape[shape] = ours_by_shape.get(shape, 0.0) + tb + tr_sum
            print(
                f"{layer}.{role:<14}{tref_sum:10.2f}{tb + tr_sum:8.2f}{tb:7.2f}{tr_sum:8.2f}"
                f"{tref_sum / (tb + tr_sum):7.1f}{out.nss:14.2e}"
                f"{out.max_angle_left:10.2e}{out.max_angle_right:10.2e}",
                flush=True,
            )
    stored = {shape: 2 * pairs * naive_svd_time(shape) for shape, pairs in n_pairs.items()}
    flipped = {s: 2 * pairs * naive_svd_time(s, transposed=True) for s, pairs in n_pairs.items()}
    best_by_shape = {s: min(t, flipped[s], ref_by_shape[s]) for s, t in stored.items()}
    naive, best = sum(stored.values()), sum(best_by_shape.values())
    print(f"\n{'shape':<12}{'naive s':>9}{'naive-T s':>10}{'ours s':>8}{'vs best':>8}")
    for shape, t in stored.items():
        t_ours = ours_by_shape[shape]
        best_shape = best_by_shape[shape]
        print(
            f"{shape[0]}x{shape[1]:<7}{t:9.2f}{ref_by_shape[shape]:10.2f}{t_ours:8.2f}"
            f"{best_shape / t_ours:7.1f}x"
        )
    ours = t_base + t_run
    print(f"\nnaive   float64 torch.linalg.svd of base and run per pair, as stored: {naive:7.1f} s")
    print(f"naive-T the same, tall matrices transposed (measured, interleaved)  : {t_ref:7.1f} s")
    print(f"best    fastest of as stored / transposed view / naive-T, per shape  : {best:7.1f} s")
    print(f"ours    base_geometry {t_base:.1f} s + run_geometry {t_run:.1f} s = {ours:.1f} s")
    print(
        f"speed-up: {naive / ours:.1f}x vs naive, {t_ref / ours:.1f}x vs naive-T, "
        f"{best / ours:.1f}x vs best"
    )
    if args.sft:
        print(
            f"SFT-like runs (not in the totals above): ours {t_sft:.1f} s, naive-T {t_sft_ref:.1f} s"
        )
    for kind, (e_nss, e_left, e_right) in worst.items():
        if kind == "rl" or args.sft:
            print(
                f"max rel. error vs float64 reference ({kind}): nss {e_nss:.1e}, "
                f"max angle left {e_left:.1e}, right {e_right:.1e}"
            )


if __name__ == "__main__":
    main()
