"""Benchmark: a run's geometry by the certified warm-started method vs a full ``eigh`` per run.

Builds synthetic bf16 weights at a model's real layer shapes with power-law spectra, N RL-like
runs (1-3 bf16 ULPs on ~40% of the entries) and optionally one SFT-like run (timed apart), and
times, side by side and interleaved (so that load from other processes hits both alike):

- old: the float64 Gram W^T W (one gemm) and a full ``eigh`` with vectors, for the base and for
  every run (the method before `top_subspace`'s LOBPCG; its values and vectors are also the
  reference, validated against a float64 SVD to 5e-12);
- new: `base_geometry` once (blocked Gram, ``eigvalsh`` and ``eigh``, top vectors kept, the
  masks) and `run_geometry` per run (blocked Gram, ``eigvalsh``, LOBPCG from the base's top
  vectors with a certified bound, ``eigh`` when it cannot certify).

Per tensor it prints the times, the ratio old/new per run, the cache entry's bytes against the
base's bf16 bytes, the worst relative errors of NSS and of the max left/right angles against
the reference, the largest certified bound and whether every angle lies within it. With
``--svd-reference`` the reference is a float64 ``torch.linalg.svd`` of base and run instead.

Run (CPU, one thread; sizes: 1.5B layer ~3 min, 8B layer ~25 min on a loaded 2-core machine):
    .venv/bin/python benchmarks/geometry.py --model qwen2.5-1.5b --runs 2
    .venv/bin/python benchmarks/geometry.py --model qwen3-8b --runs 2 --only gate_proj
GPU: add ``--device cuda`` (both methods on the device, in float64).
"""

from __future__ import annotations

import argparse
import time

import torch

from rlvr_ray.stats.spectral import (
    base_geometry,
    cache_bytes,
    normalized_spectral_shift,
    principal_angles,
    run_geometry,
)

MODELS = {  # (hidden, intermediate, heads, kv heads, head dim)
    "qwen2-0.5b": (896, 4864, 14, 2, 64),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128),
    "qwen3-8b": (4096, 12288, 32, 8, 128),
    "llama-70b": (8192, 28672, 64, 8, 128),
}


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    """One decoder layer's matrices [out, in], as stored."""
    hidden, inter, heads, kv, head_dim = MODELS[model]
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
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


def old_method(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-matrix work before: float64 Gram (one gemm) and a full ``eigh`` with vectors ->
    (all singular values, top-k left, top-k right singular bases), in w's own frame."""
    w = w.double()
    tall = w.T if w.shape[0] < w.shape[1] else w
    lam, v = torch.linalg.eigh(tall.T @ tall)
    sigma, q = lam.flip(0).clamp(min=0).sqrt(), v.flip(1)[:, :k]
    u = torch.linalg.qr(tall @ q).Q
    return (sigma, u, q) if tall is w else (sigma, q, u)


def svd_reference(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 SVD on the CPU -> (all singular values, top-k left, top-k right bases)."""
    u, s, vh = torch.linalg.svd(w.double().cpu(), full_matrices=False)
    return s, u[:, :k], vh[:k].T


def timed(fn, *args):
    if args and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, default="qwen2.5-1.5b", help="layer shapes")
    ap.add_argument("--only", nargs="*", help="these roles only (default: the whole layer)")
    ap.add_argument("--shape", nargs=2, type=int, action="append", help="extra M N matrix")
    ap.add_argument("--runs", type=int, default=2, help="RL-like runs per base (default 2)")
    ap.add_argument("--sft", action="store_true", help="add one SFT-like run per base")
    ap.add_argument("--device", default="cpu", help="device for both methods (default cpu)")
    ap.add_argument("--svd-reference", action="store_true", help="reference: float64 SVD")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1; 0: default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    shapes = {r: s for r, s in layer_shapes(args.model).items() if not args.only or r in args.only}
    shapes.update({f"{m}x{n}": (m, n) for m, n in args.shape or []})
    total = {"old_base": 0.0, "new_base": 0.0, "old_run": 0.0, "new_run": 0.0}
    sft_total = [0.0, 0.0]
    print(
        f"{'tensor':<11}{'shape':>12}{'base old':>9}{'new':>7}{'run old':>9}{'new':>7}{'ratio':>7}"
        f"{'cache':>7}{'nss err':>9}{'left err':>9}{'right err':>10}{'bound':>9}{'ok':>4}"
    )
    for role, shape in shapes.items():
        w0 = powerlaw_bf16(*shape, gen)
        runs = [("rl", ulp_update(w0, gen)) for _ in range(args.runs)]
        runs += [("sft", sft_update(w0, gen))] if args.sft else []
        w0d = w0.to(dev)
        base, t_new_base = timed(base_geometry, w0d)
        k = base.spectral_k
        ref0, t_old_base = timed(old_method, w0d, k)
        if args.svd_reference:
            ref0 = svd_reference(w0, k)
        share = cache_bytes(base.to_tensors()) / (2 * w0.numel())
        t_old = t_new = 0.0
        worst, bound_max, within = [0.0, 0.0, 0.0], 0.0, True
        for kind, w1 in runs:  # interleaved, so load from other processes hits both alike
            w1d = w1.to(dev)
            mask = w1d.view(torch.int16) != w0d.view(torch.int16)
            out, t_n = timed(run_geometry, base, w1d, mask)
            ref1, t_o = timed(old_method, w1d, k)
            if args.svd_reference:
                ref1 = svd_reference(w1, k)
            if kind == "sft":
                sft_total[0], sft_total[1] = sft_total[0] + t_o, sft_total[1] + t_n
            else:
                t_old, t_new = t_old + t_o, t_new + t_n
            nss = normalized_spectral_shift(ref0[0], ref1[0])
            left = principal_angles(ref0[1].to(dev), ref1[1].to(dev)).cpu()
            right = principal_angles(ref0[2].to(dev), ref1[2].to(dev)).cpu()
            bound = out.angle_error_bound
            bound_max = max(bound_max, bound)
            for side, got in ((left, out.angle_left.cpu()), (right, out.angle_right.cpu())):
                within &= bool(((got - side).abs() <= bound + 1e-12).all())
            errs = (
                abs(out.nss - nss) / nss,
                abs(out.max_angle_left - float(left[0])) / float(left[0]),
                abs(out.max_angle_right - float(right[0])) / float(right[0]),
            )
            worst = [max(a, b) for a, b in zip(worst, errs, strict=True)]
        n_rl = max(args.runs, 1)
        total["old_base"] += t_old_base
        total["new_base"] += t_new_base
        total["old_run"] += t_old
        total["new_run"] += t_new
        print(
            f"{role:<11}{f'{shape[0]}x{shape[1]}':>12}{t_old_base:9.2f}{t_new_base:7.2f}"
            f"{t_old / n_rl:9.2f}{t_new / n_rl:7.2f}{t_old / max(t_new, 1e-9):6.1f}x"
            f"{share:7.2f}{worst[0]:9.1e}{worst[1]:9.1e}{worst[2]:10.1e}{bound_max:9.1e}"
            f"{'yes' if within else 'NO':>4}",
            flush=True,
        )
    n_rl = max(args.runs, 1)
    print(f"\nper run (sum over the tensors, mean over {args.runs} RL-like runs):")
    print(
        f"  old {total['old_run'] / n_rl:.1f} s, new {total['new_run'] / n_rl:.1f} s: "
        f"{total['old_run'] / max(total['new_run'], 1e-9):.1f}x"
    )
    print(f"base: old {total['old_base']:.1f} s, new {total['new_base']:.1f} s")
    for runs in (args.runs, 5):
        old = total["old_base"] + runs * total["old_run"] / n_rl
        new = total["new_base"] + runs * total["new_run"] / n_rl
        print(f"base + {runs} runs: old {old:.1f} s, new {new:.1f} s: {old / new:.1f}x")
    if args.sft:
        print(f"SFT-like run: old {sft_total[0]:.1f} s, new {sft_total[1]:.1f} s")


if __name__ == "__main__":
    main()
