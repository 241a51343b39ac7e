"""A varied sweep scanned in-process by ScanWorker, and a row-for-row comparison of two scans.

The sweep holds what exercises every producer of every column: a planted Qwen2 group with a
step series (its step-pair groups too), a resized vocabulary, a run holding NaN, a run missing a
tensor, an F32 tensor (rounded to bf16) and an int tensor; a tied-embedding base against an
untied run; MoE experts, per-expert (Qwen3-MoE) and fused (gpt-oss); FP8 weights with block
scales; a tensor large enough to be streamed. Geometry is on.

Scan with the code on ``PYTHONPATH`` (both the fused CPU pass and the torch path), then compare:

    PYTHONPATH=$CHECKOUT python tests/engine/varied_sweep.py scan /tmp/sweep /tmp/before
    PYTHONPATH=$CHECKOUT python tests/engine/varied_sweep.py scan /tmp/sweep /tmp/after
    python tests/engine/varied_sweep.py compare /tmp/before /tmp/after

The checkpoints are written under the first directory once (the tables name their paths, so
both scans read the same ones). ``compare`` reads every table of both scans and requires the same rows with byte-identical
values (floats compared by their exact repr), except the scan id.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from rlvr_ray.engine.config import Group, Params, Run, step_pair_groups
from rlvr_ray.engine.plan import RunSpec, plan_group
from rlvr_ray.io.checkpoint import open_checkpoint
from rlvr_ray.lab.planted import plant_update, planted_family, random_base, write_checkpoint

PARAMS = Params(rank_k=4, spectral_k=8)
UNIT_BYTES = 1 << 17  # several units per group
#: the paths each scan takes: (name, RLVR_RAY_KERNELS)
PATHS = (("fused", "numba"), ("torch", "torch"))
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _save_bf16(path: Path, tensors: dict[str, np.ndarray], config: dict, dtypes=None) -> Path:
    """uint16 bf16 patterns (or, by ``dtypes``, other torch tensors) as an HF directory."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    out = {}
    for k, v in tensors.items():
        out[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(v.view(np.int16).copy())
        if not isinstance(v, torch.Tensor):
            out[k] = out[k].view(torch.bfloat16)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _qwen_group(root: Path) -> Group:
    fam = planted_family(root / "qwen", runs={"grpo-a": 0.3, "grpo-b": 0.2, "sft": 0.9}, seed=1)
    rng = np.random.default_rng(2)
    base = fam.bits["base"]
    cfg = json.loads((fam.base / "config.json").read_text())
    # grpo-a's fp32 master: its bf16 values plus less than half a ULP (bf16(master) is the
    # checkpoint), so the precision gate is measured too
    master = {}
    for name, bits in fam.bits["grpo-a"].items():
        low = rng.integers(0, 1 << 15, bits.shape, dtype=np.uint32)
        master[name] = torch.from_numpy(((bits.astype(np.uint32) << 16) | low).view(np.float32))
    master_dir = _save_bf16(root / "qwen" / "grpo-a-master", master, cfg)
    runs = [
        Run(
            name="grpo-a",
            checkpoint=str(fam.runs["grpo-a"]),
            algorithm="grpo",
            seed=1,
            dataset="math",
            master=str(master_dir),
        ),
        Run(name="grpo-b", checkpoint=str(fam.runs["grpo-b"]), algorithm="grpo", seed=2),
        Run(name="sft", checkpoint=str(fam.runs["sft"]), algorithm="sft"),
    ]
    for step in (10, 20, 30):  # a series of saved steps: step-pair groups
        t = {k: plant_update(v, 0.02 * step / 10, rng) for k, v in base.items()}
        path = write_checkpoint(root / "qwen" / f"s{step}", t, "qwen2", 2)
        master = None
        if step == 30:  # a step with a master that lacks one tensor (missing_in_master)
            up = {
                k: torch.from_numpy((v.astype(np.uint32) << 16).view(np.float32))
                for k, v in t.items()
            }
            del up["model.layers.0.mlp.down_proj.weight"]
            master = str(_save_bf16(root / "qwen" / f"s{step}-master", up, cfg))
        runs.append(
            Run(
                name=f"s{step}",
                checkpoint=str(path),
                algorithm="dapo",
                step=step,
                series="s",
                master=master,
            )
        )
    odd = {k: plant_update(v, 0.25, rng) for k, v in base.items()}
    odd[EMBED] = np.concatenate([odd[EMBED], random_base((8, odd[EMBED].shape[1]), rng)])
    odd["model.layers.0.mlp.up_proj.weight"] = odd["model.layers.0.mlp.up_proj.weight"].copy()
    odd["model.layers.0.mlp.up_proj.weight"][3, 5] = 0x7FC0  # NaN
    del odd["model.layers.1.mlp.gate_proj.weight"]
    odd["model.layers.1.self_attn.o_proj.weight"] = odd["model.layers.1.self_attn.o_proj.weight"][
        :, :16
    ].copy()  # shape mismatch
    tensors = dict(odd)
    f32 = (odd["model.norm.weight"].astype(np.uint32) << 16).view(np.float32)
    tensors["model.norm.weight"] = torch.from_numpy(f32.copy())
    tensors["model.layers.0.extra_index"] = torch.arange(12, dtype=torch.int64)
    runs.append(Run(name="odd", checkpoint=str(_save_bf16(root / "qwen" / "odd", tensors, cfg))))
    return Group(name="qwen", base=str(fam.base), runs=runs, step_pairs=True)


def _tied_group(root: Path) -> Group:
    rng = np.random.default_rng(3)
    h, vocab = 48, 64
    shapes = {
        EMBED: (vocab, h),
        "model.layers.0.self_attn.q_proj.weight": (h, h),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.norm.weight": (h,),
    }
    base = {k: random_base(s, rng) for k, s in shapes.items()}
    cfg = {"model_type": "qwen2", "num_hidden_layers": 1, "tie_word_embeddings": True}
    b = _save_bf16(root / "tied" / "base", base, cfg)
    untied = {k: plant_update(v, 0.3, rng) for k, v in base.items()}
    untied[HEAD] = plant_update(base[EMBED], 0.2, rng)
    u = _save_bf16(root / "tied" / "untied", untied, cfg | {"tie_word_embeddings": False})
    again = {k: plant_update(v, 0.1, rng) for k, v in base.items()}
    t = _save_bf16(root / "tied" / "tied", again, cfg)
    runs = [Run(name="untied", checkpoint=str(u)), Run(name="tied", checkpoint=str(t))]
    return Group(name="tied", base=str(b), runs=runs)


def _moe_groups(root: Path) -> list[Group]:
    from tests.moe_checkpoints import save_family

    groups = []
    for family in ("qwen3_moe", "gpt_oss"):
        base = save_family(family, root / family / "base", seed=0)
        runs = []
        for i, density in enumerate((0.3, 0.2)):
            rng = np.random.default_rng(10 + i)
            tensors = load_file(str(base / "model.safetensors"))
            for k, v in tensors.items():
                if v.dtype == torch.bfloat16:
                    bits = v.view(torch.int16).numpy().view(np.uint16)
                    moved = plant_update(bits, density, rng)
                    tensors[k] = torch.from_numpy(moved.view(np.int16)).view(torch.bfloat16)
            path = root / family / f"r{i}"
            path.mkdir(parents=True)
            (path / "config.json").write_text((base / "config.json").read_text())
            save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
            master = None
            if i == 0:  # an exact fp32 master of an MoE run: expert rows in the precision gate
                up = {k: v.float() for k, v in tensors.items() if v.dtype == torch.bfloat16}
                master = str(root / family / f"r{i}-master.safetensors")
                save_file(up, master, metadata={"format": "pt"})
            runs.append(Run(name=f"r{i}", checkpoint=str(path), algorithm="grpo", master=master))
        groups.append(Group(name=family.replace("_", "-"), base=str(base), runs=runs))
    return groups


def _fp8_group(root: Path) -> Group:
    rng = np.random.default_rng(4)
    cfg = {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 1,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    p = "model.layers.0."
    weights = {
        p + "mlp.experts.0.gate_proj.weight": (torch.float8_e4m3fn, (256, 300)),
        p + "mlp.shared_experts.up_proj.weight": (torch.float8_e5m2, (130, 128)),
    }
    copies: dict[str, dict] = {"base": {}, "rl": {}, "rl2": {}}
    for name, (dtype, shape) in weights.items():
        top = 0x7E if dtype == torch.float8_e4m3fn else 0x7B
        p0 = rng.integers(0, top, size=shape).astype(np.uint8) | (
            rng.integers(0, 2, size=shape).astype(np.uint8) << 7
        )
        scale = rng.uniform(1e-3, 1e-2, size=(-(-shape[0] // 128), -(-shape[1] // 128)))
        for run, share in (("base", 0.0), ("rl", 0.3), ("rl2", 0.2)):
            moved = rng.random(shape) < share
            p1 = np.where(moved & ((p0 & 0x7F) < top - 1), p0 + 1, p0).astype(np.uint8)
            s1 = scale.astype(np.float32).copy()
            if run == "rl":
                s1[0, 0] *= 2
            copies[run][name] = torch.from_numpy(p1).view(dtype)
            copies[run][name + "_scale_inv"] = torch.from_numpy(s1)
    norm = torch.from_numpy(random_base((128,), rng).view(np.int16)).view(torch.bfloat16)
    paths = {}
    for run, tensors in copies.items():
        paths[run] = _save_bf16(
            root / "fp8" / run, {**tensors, p + "input_layernorm.weight": norm}, cfg
        )
    runs = [Run(name=r, checkpoint=str(paths[r])) for r in ("rl", "rl2")]
    return Group(name="fp8", base=str(paths["base"]), runs=runs)


def _big_group(root: Path) -> Group:
    """An embedding of more than STREAM_MIN_BYTES: the torch path streams it in windows."""
    rng = np.random.default_rng(5)
    shapes = {EMBED: (8200, 1024), "model.layers.0.self_attn.q_proj.weight": (64, 64)}
    base = {k: random_base(s, rng) for k, s in shapes.items()}
    cfg = {"model_type": "qwen2", "num_hidden_layers": 1}
    b = _save_bf16(root / "big" / "base", base, cfg)
    runs = []
    for i, density in enumerate((0.01, 0.02)):
        t = {k: plant_update(v, density, rng) for k, v in base.items()}
        runs.append(Run(name=f"r{i}", checkpoint=str(_save_bf16(root / "big" / f"r{i}", t, cfg))))
    return Group(name="big", base=str(b), runs=runs)


def write_sweep(root: Path, big: bool = True) -> list[Group]:
    """Write every checkpoint under ``root`` -> the sweep's groups (``big``: with the group
    whose embedding is large enough to be streamed by the torch path)."""
    return [
        _qwen_group(root),
        _tied_group(root),
        *_moe_groups(root),
        _fp8_group(root),
        *([_big_group(root)] if big else []),
    ]


def with_step_pairs(groups: list[Group]) -> list[Group]:
    """The groups and their step-pair groups, as a scan plans them."""
    return [g2 for g in groups for g2 in (g, *step_pair_groups(g))]


def scan_groups(groups: list[Group], out: Path, kernels: str = "numba"):
    """Every unit of every group by one ScanWorker (CPU) -> the worker (its reports written)."""
    from rlvr_ray.engine.worker import ScanWorker

    os.environ["RLVR_RAY_KERNELS"] = kernels
    worker = ScanWorker(str(out), device="cpu")
    for g in groups:
        base = open_checkpoint(g.base)
        runs = []
        for r in g.runs:
            ck = open_checkpoint(r.checkpoint)
            spec = RunSpec.of(r, ck)
            runs.append((spec, ck))
        for unit in plan_group(g, base, runs, PARAMS, UNIT_BYTES).units:
            worker.run_unit(unit)
    return worker


def read_tables(out: Path) -> dict[str, list[str]]:
    """table -> its rows (scan id blanked) as sorted exact reprs, over every part."""
    tables = {}
    for d in sorted((out / "tables").iterdir()):
        rows = pq.read_table(d).to_pylist()
        for r in rows:
            r.pop("scan_id", None)
        tables[d.name] = sorted(repr(sorted(r.items())) for r in rows)
    return tables


def compare(a: Path, b: Path) -> list[str]:
    """-> the differences between two scans' tables (empty: identical)."""
    ta, tb = read_tables(a), read_tables(b)
    diffs = [f"table {t}: only in one scan" for t in ta.keys() ^ tb.keys()]
    for t in ta.keys() & tb.keys():
        if ta[t] != tb[t]:
            only_a = sorted(set(ta[t]) - set(tb[t]))[:3]
            only_b = sorted(set(tb[t]) - set(ta[t]))[:3]
            diffs.append(f"table {t}: {len(ta[t])} vs {len(tb[t])} rows; {only_a} vs {only_b}")
    return diffs


def main(argv: list[str]) -> int:
    if argv[0] == "scan":
        ckpts, out = Path(argv[1]), Path(argv[2])
        if not ckpts.exists():
            groups = [g.model_dump(mode="json") for g in write_sweep(ckpts)]
            (ckpts / "groups.json").write_text(json.dumps(groups))
        groups = [Group.model_validate(g) for g in json.loads((ckpts / "groups.json").read_text())]
        groups = with_step_pairs(groups)
        for name, kernels in PATHS:
            scan_groups(groups, out / name, kernels)
            n = {k: len(v) for k, v in read_tables(out / name).items()}
            print(name, n)
        return 0
    diffs = []
    for name, _ in PATHS:
        diffs += [f"{name}: {d}" for d in compare(Path(argv[1]) / name, Path(argv[2]) / name)]
    print("\n".join(diffs) or "identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
