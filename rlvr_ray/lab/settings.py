"""Settings of a lab build: one frozen dataclass, three presets, and the runs of every family.

Every field is part of the cache key (``build``), ``threads`` included: CPU matmul reduction
order depends on the thread count, so bitwise reproducibility holds per thread count.

Defaults are chosen for realism at toy scale, not for a wanted answer:

- pretraining (AdamW lr 3e-3, 5% warm-up then cosine over ``pretrain_steps``, batch 128, wd 0.1)
  stops at the first evaluation where the base reaches ``target_acc`` greedy exact match, so
  RL has something left to improve;
- the trained base's linear weights have a median |w| of about 0.02, the same scale as the
  linear weights of 1.5B-8B models, so learning rates keep their real-world values: RL 1e-6
  (DeepScaleR, DAPO, ProRL use 1e-6 to 2e-6), constant, AdamW (0.9, 0.999, wd 0.01), grad-norm
  clip 1.0, 16 prompts x 8 samples per step, two minibatch updates per step, KL coefficient 1e-3
  (GRPO loss / REINFORCE++ reward), clip 0.2 (DAPO 0.2 / 0.28), 150 steps;
- SFT: lr 1e-5 (10x RL), 10% warm-up then constant, batch 128 correct answers, 150 steps.

What moves the figures most (measured on 64-wide, 2-block qwen2 bases, 150 steps each): the learning
rate. bf16 sparsity of GRPO is ~0.45 at lr 1e-6, ~0.25 at 3e-6, ~0.12 at 1e-5; SFT's is ~0.08
at 1e-5, ~0.13 at 3e-6 and ~0.23 at 1e-6, so at equal lr and steps RL stays about twice as
sparse as SFT, and the realistic 10x lr gap widens that to ~6x. Sparsity falls with steps
(GRPO ~0.72 / 0.55 / 0.45 at steps 50 / 100 / 150): real runs of thousands of steps would sit
lower. AdamW moves ~99.9% of the fp32 master coordinates in every run: which moves show in the
checkpoint is decided by bf16 rounding (the precision gate).

Size: the default is 128 wide with 4 blocks, so that the rank rule of the geometry statistics
(k = 0.0417 of a matrix's short side) leaves k = 5 on the 128-wide matrices and 3 on the 64-wide
k/v projections, well below their rank (a 64-wide model at the paper's fixed k = 64 made the
principal set the exact complement of the low-magnitude one). CPU cost per family, one thread
(measured): RL 0.46 s per step at 128 x 4 (0.11 at 64 x 2, 1.55 at 256 x 4); the default qwen2
family took 390 CPU seconds in all (user + sys), so the three take ~10 minutes of 2 cores, and
256 x 4 would take ~35. ``paper`` (512 wide, 8 blocks: k = 21)
follows the same recipe; it is meant for a GPU (``--device auto`` trains on CUDA when present):
on the CPU it takes hours.

The ``tiny`` preset is a smoke test: its learning rates are raised (RL 1e-4, SFT 1e-3) so that
three steps visibly change weights; its figures mean nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

ARCHS = ("qwen2", "llama", "mistral")


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of a family: its name (also the series name), algorithm, data, seed."""

    name: str
    algorithm: str  # grpo | dapo | reinforce++ | sft
    dataset: str  # a task.subset name
    seed: int
    save_master: bool = False  # also write the fp32 master weights at every saved step


#: every run keeps its fp32 masters (a few MB per step at the default size): the sweep hands
#: them to the scan, whose precision_gate table measures what bf16 rounding erased
DEFAULT_RUNS = (
    RunSpec("grpo-s1", "grpo", "arith-a", 1, save_master=True),
    RunSpec("grpo-s2", "grpo", "arith-b", 2, save_master=True),
    RunSpec("dapo-s3", "dapo", "arith-c", 3, save_master=True),
    RunSpec("reinforcepp-s4", "reinforce++", "arith-d", 4, save_master=True),
    RunSpec("sft-s5", "sft", "arith-a", 5, save_master=True),
)


@dataclass(frozen=True)
class LabSettings:
    """Everything that decides a lab build's bytes (all fields enter the cache key)."""

    archs: tuple[str, ...] = ("qwen2", "llama", "mistral")
    hidden: int = 128  # model width; heads = hidden / 16
    layers: int = 4  # transformer blocks
    n_digits: int = 3  # operand width of the addition task
    pretrain_steps: int = 1000  # maximum pretraining optimizer steps (cosine schedule length)
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 128
    target_acc: float = 0.4  # stop pretraining once greedy eval accuracy reaches this
    rl_steps: int = 150  # rollout steps per RL run (each has `minibatches` optimizer updates)
    rl_lr: float = 1e-6
    prompts_per_step: int = 16
    group_size: int = 8  # samples per prompt (the GRPO group)
    minibatches: int = 2  # optimizer updates per rollout batch (PPO-style minibatches)
    kl_coef: float = 1e-3
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher; GRPO and REINFORCE++ use clip_low both ways
    max_gen_batches: int = 3  # DAPO dynamic sampling: rollout batches tried per step
    temperature: float = 1.0
    sft_steps: int = 150
    sft_lr: float = 1e-5
    sft_batch: int = 128
    pool_size: int = 2048  # problems per data subset
    eval_size: int = 512
    eval_every: int = 25  # steps between greedy evaluations (pretraining, RL and SFT)
    n_saves: int = 3  # checkpoints per run, evenly spaced, the last at the final step
    threads: int = 1  # torch CPU threads; 2+ spin badly when other jobs share the cores
    seed: int = 0
    runs: tuple[RunSpec, ...] = field(default=DEFAULT_RUNS)

    def __post_init__(self) -> None:
        bad = [a for a in self.archs if a not in ARCHS]
        if bad or not self.archs:
            raise ValueError(f"archs: unknown {bad or 'empty'}; expected some of {list(ARCHS)}")
        if self.hidden <= 0 or self.hidden % 32:
            raise ValueError(f"hidden: {self.hidden} is not a positive multiple of 32")
        for name in ("layers", "pretrain_steps", "rl_steps", "sft_steps", "group_size", "n_saves"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if len({r.name for r in self.runs}) != len(self.runs):
            raise ValueError("runs: names must be unique")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def save_steps(self, total: int) -> list[int]:
        """The ``n_saves`` evenly spaced steps of a ``total``-step run, ending at ``total``."""
        return sorted({max(1, round(total * (i + 1) / self.n_saves)) for i in range(self.n_saves)})


PRESETS: dict[str, LabSettings] = {
    "default": LabSettings(),
    # the paper's regime for the geometry: matrices 512 wide (k = 21 by the rank rule; the
    # 256-wide k/v projections get 11), 8 blocks; the same recipe as the default
    "paper": LabSettings(hidden=512, layers=8),
    "tiny": LabSettings(
        hidden=32,
        layers=1,
        n_digits=2,
        pretrain_steps=120,
        pretrain_lr=1e-2,
        pretrain_batch=64,
        target_acc=1.0,
        rl_steps=3,
        rl_lr=1e-4,
        prompts_per_step=4,
        group_size=4,
        sft_steps=3,
        sft_lr=1e-3,
        sft_batch=16,
        pool_size=64,
        eval_size=64,
        eval_every=40,
    ),
}


def lab_settings(preset: str = "default", **overrides: Any) -> LabSettings:
    """The ``preset``'s settings with ``overrides`` (None values ignored) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "archs" in changes:
        changes["archs"] = tuple(changes["archs"])
    return replace(PRESETS[preset], **changes)
