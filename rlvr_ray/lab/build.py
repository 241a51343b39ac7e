"""Build the lab: per architecture a pretrained base and its RL/SFT runs, plus the sweep YAML.

    build_lab(Path("lab-out"))                 # default preset, three families (~10 min, 2 cores)
    build_lab(Path("/tmp/lab"), preset="tiny") # seconds; used by the tests

Layout under ``out`` (checkpoints are Hugging Face directories: config.json + bf16
model.safetensors):

    manifest.json                      settings, cache key, per-family accuracies
    sweep.yaml                         groups/runs for ``rlvr-ray`` (paths relative to out)
    <arch>/base/                       bf16 rounding of the pretrained fp32 weights
    <arch>/pretrain_log.json
    <arch>/runs/<run>/step-<NNNN>/     bf16 rounding of the run's fp32 master at that step
    <arch>/runs/<run>/master_fp32/step-<NNNN>/   fp32 masters (runs with save_master; the
                                       sweep names each as its step's ``master``)
    <arch>/runs/<run>/train_log.json
    <arch>/curves/<run>.json           step, mean_reward (RL), loss (SFT), accuracy (greedy eval)
    <arch>/curves/pretrain.json

Every run's fp32 master starts from the bf16 base values (as a pipeline that loads a bf16
checkpoint does) and its reference model is that bf16 base. The build is cached: the manifest
stores a hash of the settings and ``CODE_VERSION`` (and the device, for a CUDA build); the same
settings return at once.

Device: ``device="auto"`` trains on CUDA when torch sees a device, else on the CPU. A CPU build's
bytes are fixed by its settings (its thread count included); a CUDA build follows the same
recipe from the same initial weights and data, but its kernels round differently, so its bytes
differ from the CPU's (and are not promised bit for bit across GPU models or library versions).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rlvr_ray.lab import models, rl, train
from rlvr_ray.lab.settings import LabSettings, RunSpec, lab_settings

CODE_VERSION = "lab-1"
Log = Callable[[str], None]


def settings_key(s: LabSettings, device: str = "cpu") -> str:
    """Cache key of a build: sha256 of the settings, ``CODE_VERSION`` and, unless ``cpu``, the
    device (16 hex digits)."""
    keyed: dict[str, Any] = {"code": CODE_VERSION, "settings": s.to_dict()}
    if device != "cpu":
        keyed["device"] = device
    blob = json.dumps(keyed, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _final_accuracy(curve: list[dict[str, Any]]) -> float | None:
    accs = [p["accuracy"] for p in curve if p.get("accuracy") is not None]
    return accs[-1] if accs else None


def train_run(
    fam: Path,
    cfg: Any,
    base: dict[str, torch.Tensor],
    s: LabSettings,
    run: RunSpec,
    log: Log,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one run on ``device`` from the bf16 ``base`` state; write its checkpoints, curve
    and log."""
    t0 = time.perf_counter()
    run_dir = fam / "runs" / run.name
    master = models.new_model(cfg, seed=0, device=device)
    models.load_rounded(master, base)
    evaluate = train.Evaluator(s, cfg, device)
    saved: list[int] = []

    def save(step: int, model: torch.nn.Module) -> None:
        models.save_checkpoint(model, run_dir / f"step-{step:04d}")
        if run.save_master:
            models.save_checkpoint(
                model, run_dir / "master_fp32" / f"step-{step:04d}", torch.float32
            )
        saved.append(step)

    if run.algorithm == "sft":
        curve = train.sft(master, s, run, evaluate, save)
        lr, steps = s.sft_lr, s.sft_steps
    else:
        ref = models.new_model(cfg, seed=0, device=device)
        models.load_rounded(ref, base)
        ref.requires_grad_(False)
        curve = rl.rl_train(master, ref, s, run, evaluate, save)
        lr, steps = s.rl_lr, s.rl_steps
    entry = {**run.__dict__, "lr": lr, "steps": steps, "saved_steps": saved}
    entry |= {"base_accuracy": curve[0]["accuracy"], "final_accuracy": _final_accuracy(curve)}
    entry["wall_s"] = round(time.perf_counter() - t0, 2)
    _write_json(fam / "curves" / f"{run.name}.json", {"run": run.name, "points": curve})
    _write_json(run_dir / "train_log.json", entry)
    log(
        f"{fam.name}/{run.name}: acc {entry['base_accuracy']:.3f} -> {entry['final_accuracy']:.3f} "
        f"({entry['wall_s']:.0f} s)"
    )
    return entry


def build_family(
    out: Path, arch: str, s: LabSettings, log: Log, device: str = "cpu"
) -> dict[str, Any]:
    """Pretrain ``arch``'s base on ``device``, then train all of ``s.runs`` from it; returns the
    family log."""
    t0 = time.perf_counter()
    fam = out / arch
    cfg = models.make_config(arch, s.hidden, s.layers)
    model = models.new_model(cfg, seed=zlib.crc32(arch.encode()) + s.seed, device=device)
    curve = train.pretrain(model, s, train.Evaluator(s, cfg, device), seed=s.seed)
    models.save_checkpoint(model, fam / "base")
    base = models.bf16_state(model)
    pre = {"steps": curve[-1]["step"], "accuracy": curve[-1]["accuracy"]}
    pre["wall_s"] = round(time.perf_counter() - t0, 2)
    _write_json(fam / "curves" / "pretrain.json", {"run": "pretrain", "points": curve})
    _write_json(fam / "pretrain_log.json", pre)
    log(
        f"{arch}: base acc {pre['accuracy']:.3f} after {pre['steps']} steps ({pre['wall_s']:.0f} s)"
    )
    runs = [train_run(fam, cfg, base, s, run, log, device) for run in s.runs]
    return {"pretrain": pre, "runs": runs}


def _family_in_process(out: Path, arch: str, s: LabSettings, device: str) -> dict[str, Any]:
    torch.set_num_threads(s.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    return build_family(out, arch, s, log, device)


def _build_families(
    out: Path, s: LabSettings, log: Log, jobs: int | None, device: str = "cpu"
) -> dict[str, dict]:
    """Train every architecture's family, ``jobs`` at a time (processes: one GIL each)."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(s.archs)))
    if jobs == 1:
        prev = torch.get_num_threads()
        torch.set_num_threads(s.threads)
        try:
            return {arch: build_family(out, arch, s, log, device) for arch in s.archs}
        finally:
            torch.set_num_threads(prev)
    ctx = multiprocessing.get_context("spawn")  # no forked torch/Ray state in the children
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {arch: pool.submit(_family_in_process, out, arch, s, device) for arch in s.archs}
        return {arch: f.result() for arch, f in futures.items()}


def sweep_groups(s: LabSettings, families: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep YAML's ``groups``: one per arch, one entry per saved step of every run, and
    the step pairs of every run's saved steps."""
    groups = []
    for arch in s.archs:
        entries = []
        for r in families[arch]["runs"]:
            final = max(r["saved_steps"])
            for step in sorted(r["saved_steps"], reverse=True):
                entries.append(
                    {
                        "name": r["name"] if step == final else f"{r['name']}@{step}",
                        "checkpoint": f"{arch}/runs/{r['name']}/step-{step:04d}",
                        "algorithm": r["algorithm"],
                        "step": step,
                        "dataset": r["dataset"],
                        "seed": r["seed"],
                        "series": r["name"],
                        "consistency": step == final and r["algorithm"] != "sft",
                    }
                )
                if r.get("save_master"):  # the scan's precision gate reads it
                    master = f"{arch}/runs/{r['name']}/master_fp32/step-{step:04d}"
                    entries[-1]["master"] = master
        # step_pairs: the k-step sparsity between consecutive saved steps of every run
        groups.append(
            {"name": f"{arch}-lab", "base": f"{arch}/base", "runs": entries, "step_pairs": True}
        )
    return groups


def _clear_previous(out: Path) -> None:
    """Remove what an earlier build recorded in its manifest (and only that)."""
    manifest = out / "manifest.json"
    if not manifest.exists():
        return
    old = json.loads(manifest.read_text())
    manifest.unlink()
    for rel in old.get("outputs", []):
        path = out / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def build_lab(
    out: Path,
    *,
    preset: str = "default",
    archs: tuple[str, ...] | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    pretrain_steps: int | None = None,
    rl_steps: int | None = None,
    sft_steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    force: bool = False,
    settings: LabSettings | None = None,
    log: Log | None = None,
    jobs: int | None = None,
    device: str = "auto",
) -> Path:
    """Build (or reuse) the lab under ``out``; returns the path of its sweep YAML.

    ``settings`` replaces ``preset`` and the keyword overrides when given. The build is skipped
    when ``out/manifest.json`` records the same settings key, unless ``force``. ``jobs``
    families train at once in separate processes (default: one per CPU core, at most one per
    architecture); each family is seeded on its own, so the checkpoints do not depend on it.
    ``device``: ``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda`` (a ValueError
    when torch sees no CUDA device).
    """
    out = Path(out)
    s = settings or lab_settings(
        preset,
        archs=archs,
        hidden=hidden,
        layers=layers,
        pretrain_steps=pretrain_steps,
        rl_steps=rl_steps,
        sft_steps=sft_steps,
        seed=seed,
        threads=threads,
    )
    device = models.resolve_device(device)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    key, sweep = settings_key(s, device), out / "sweep.yaml"
    manifest = out / "manifest.json"
    cached = not force and manifest.exists() and sweep.exists()
    if cached and (recorded := json.loads(manifest.read_text())).get("key") == key:
        # the checkpoints are kept; the sweep is written anew, as this code names them
        import yaml

        groups = sweep_groups(s, recorded["families"])
        sweep.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        return sweep
    _clear_previous(out)
    t0 = time.perf_counter()
    families = _build_families(out, s, log, jobs, device)
    import yaml

    sweep.write_text(yaml.safe_dump({"groups": sweep_groups(s, families)}, sort_keys=False))
    _write_json(
        manifest,
        {
            "code_version": CODE_VERSION,
            "key": key,
            "settings": s.to_dict(),
            "device": device,
            "sweep": sweep.name,
            "outputs": [*s.archs, sweep.name],
            "families": families,
            "wall_s": round(time.perf_counter() - t0, 2),
        },
    )
    return sweep
