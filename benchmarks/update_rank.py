"""Benchmark: a run's update statistics (update_rank & co.) by the certified Gram route vs
``svdvals``, and the whole per-run geometry they belong to, at a model's real layer shapes.

Per distinct matrix shape of one decoder layer: a power-law bf16 base (`base_geometry`, timed:
the base's share of a scan), an RL-like run (1-3 bf16 ULPs on ~40% of the entries) and an
SFT-like one (dense, ~30% of the weights' rms), and per run, interleaved so that load from other
processes hits every method alike:

- update: ``update_geometry`` by ``svdvals`` of dW (method 'svdvals') and by the certified
  hybrid (method 'hybrid': half-Gram + ``eigvalsh``, ``svdvals`` only when it cannot certify);
  the route the hybrid took, whether the ranks agree, and the relative differences of the stable
  and effective ranks against the ``svdvals`` ones beside their certified bounds
  (`rank_error_bounds`);
- geometry: ``run_geometry`` (NSS, angles, spectrum metrics) and the Gram + full ``eigh`` per run
  (`benchmarks.geometry.old_method`), the reference the speed target is set against.

Totals per layer count each shape as often as the layer holds it (q and o, k and v, gate and up),
for one RL-like run: the update old vs new, the whole per-run geometry (``run_geometry`` +
update) with ``svdvals`` vs with the hybrid, and beside them the Gram + full ``eigh`` + ``svdvals``.
``--planted`` adds an exactly rank-7 update per shape (the hybrid must fall back and count 7);
``--draws N`` counts how many of N more bases and updates per shape the Gram route certifies.
One thread by default (``--threads``): shared, loaded cores make multi-threaded timings erratic.

Run (CPU, one thread; Qwen2.5-1.5B ~2 min, Qwen3-8B ~12 min on an idle core):
    .venv/bin/python benchmarks/update_rank.py --model qwen2.5-1.5b --planted
    .venv/bin/python benchmarks/update_rank.py --model qwen3-8b
GPU: add ``--device cuda``.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from benchmarks.geometry import (
    MODELS,
    layer_shapes,
    old_method,
    powerlaw_bf16,
    sft_update,
    timed,
    ulp_update,
)
from rlvr_ray.stats.spectral import base_geometry, run_geometry
from rlvr_ray.stats.update import (
    gram_eigenvalues,
    rank_error_bounds,
    update_geometry,
    update_singular_values,
)


def certified_bounds(base, w0: torch.Tensor, w1: torch.Tensor) -> tuple[str, float, float]:
    """The hybrid's route and its bounds on the stable and effective ranks' relative errors."""
    dw = w1.to(base.sigma.device, torch.float64) - w0.to(base.sigma.device, torch.float64)
    tall = dw.T if base.transposed else dw
    energy = float(tall.square().sum())
    spectrum = update_singular_values(tall, energy)
    return (spectrum.route, *rank_error_bounds(spectrum, energy, tall.shape[0]))


def planted_rank7(base, w0: torch.Tensor, gen: torch.Generator) -> tuple[str, int]:
    """An exactly rank-7 update of small integers (exact in bf16 around W0 = 0) -> (route, rank)."""
    m, n = w0.shape
    a = torch.randint(-3, 4, (m, 7), generator=gen, dtype=torch.float64)
    b = torch.randint(-3, 4, (7, n), generator=gen, dtype=torch.float64)
    zero = torch.zeros(m, n, dtype=torch.bfloat16, device=base.sigma.device)
    w1 = (a @ b).to(torch.bfloat16).to(zero.device)
    return certified_bounds(base, zero, w1)[0], update_geometry(base, zero, w1).update_rank


def certified_share(shape: tuple[int, int], draws: int, gen: torch.Generator, dev) -> str:
    """How many of ``draws`` fresh bases with an RL-like (and an SFT-like) update the Gram
    route certifies full rank, e.g. 'rl 3/4, sft 4/4'."""
    hits = Counter()
    for _ in range(draws):
        w0 = powerlaw_bf16(*shape, gen)
        for kind, w1 in (("rl", ulp_update(w0, gen)), ("sft", sft_update(w0, gen))):
            dw = w1.to(dev, torch.float64) - w0.to(dev, torch.float64)
            tall = dw.T if shape[0] < shape[1] else dw
            hits[kind] += gram_eigenvalues(tall, float(tall.square().sum()))[2]
    return f"rl {hits['rl']}/{draws}, sft {hits['sft']}/{draws}"


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, default="qwen2.5-1.5b", help="layer shapes")
    ap.add_argument("--only", nargs="*", help="these roles only (default: the whole layer)")
    ap.add_argument("--device", default="cpu", help="device for every method (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1; 0: default)")
    ap.add_argument("--no-sft", action="store_true", help="RL-like runs only")
    ap.add_argument("--planted", action="store_true", help="also an exactly rank-7 update")
    ap.add_argument("--draws", type=int, default=0, help="certified share of N more draws")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    shapes = {r: s for r, s in layer_shapes(args.model).items() if not args.only or r in args.only}
    counts, roles = Counter(shapes.values()), {}
    for role, shape in shapes.items():
        roles.setdefault(shape, role)
    print(
        f"{'tensor':<10}{'shape':>11} {'run':<4}{'route':>6}{'upd old':>8}{'new':>7}{'ratio':>7}"
        f"{'run_geo':>8}{'G+eigh':>8}{'whole old':>10}{'new':>7}{'ratio':>7}"
        f"{'stable err/bound':>18}{'eff err/bound':>17}{'rank':>6}"
    )
    layer = Counter()
    for shape, count in counts.items():
        w0 = powerlaw_bf16(*shape, gen)
        w0d = w0.to(dev)
        base, t_base = timed(base_geometry, w0d)
        layer["base"] += count * t_base
        runs = [("rl", ulp_update(w0, gen))] + (
            [] if args.no_sft else [("sft", sft_update(w0, gen))]
        )
        for kind, w1 in runs:
            w1d = w1.to(dev)
            mask = w1d.view(torch.int16) != w0d.view(torch.int16)
            old, t_old = timed(update_geometry, base, w0d, w1d, "svdvals")
            new, t_new = timed(update_geometry, base, w0d, w1d, "hybrid")
            _, t_run = timed(run_geometry, base, w1d, mask)
            _, t_eigh = timed(old_method, w1d, base.spectral_k)
            route, stable_bound, eff_bound = certified_bounds(base, w0d, w1d)
            errs = (
                rel(new.update_stable_rank, old.update_stable_rank),
                rel(new.update_effective_rank, old.update_effective_rank),
            )
            if kind == "rl":
                for key, t in (("old", t_old), ("new", t_new), ("run", t_run), ("eigh", t_eigh)):
                    layer[key] += count * t
            whole_old, whole_new = t_run + t_old, t_run + t_new
            print(
                f"{roles[shape]:<10}{f'{shape[0]}x{shape[1]}':>11} {kind:<4}{route:>6}"
                f"{t_old:8.2f}{t_new:7.2f}{t_old / t_new:6.1f}x{t_run:8.2f}{t_eigh:8.2f}"
                f"{whole_old:10.2f}{whole_new:7.2f}{whole_old / whole_new:6.1f}x"
                f"{errs[0]:9.1e}/{stable_bound:8.1e}{errs[1]:8.1e}/{eff_bound:8.1e}"
                f"{'same' if new.update_rank == old.update_rank else 'DIFF':>6}",
                flush=True,
            )
        if args.draws:
            share = certified_share(shape, args.draws, gen, dev)
            print(f"{'':<10}{'':>11} Gram route certified on {share} more draws")
        if args.planted:
            route, rank = planted_rank7(base, w0d, gen)
            print(f"{'':<10}{'':>11} rank-7 update: route {route}, update_rank {rank}")
    print(f"\nper layer ({args.model}, {' '.join(shapes)}), one RL-like run:")
    print(
        f"  update: svdvals {layer['old']:.1f} s, hybrid {layer['new']:.1f} s: "
        f"{layer['old'] / layer['new']:.1f}x"
    )
    whole_old, whole_new = layer["run"] + layer["old"], layer["run"] + layer["new"]
    print(
        f"  whole per-run geometry: with svdvals {whole_old:.1f} s, with the hybrid "
        f"{whole_new:.1f} s: {whole_old / whole_new:.2f}x; Gram + full eigh + svdvals "
        f"{layer['eigh'] + layer['old']:.1f} s: {(layer['eigh'] + layer['old']) / whole_new:.2f}x"
    )
    print(f"  base_geometry {layer['base']:.1f} s (Gram + full eigh of W0 ~ {layer['eigh']:.1f} s)")


if __name__ == "__main__":
    main()
