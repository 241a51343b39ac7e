"""Supervised training for the lab: pretraining of a base and SFT runs from it.

Both minimise cross-entropy on the answer tokens only (the operand digits are random, so a loss
on them would be noise). fp32 master weights and fp32 AdamW state; grad-norm clip 1.0.
Pretraining draws fresh uniform problems every step, warms up for 5% of ``pretrain_steps`` and
decays by cosine to 10%; it stops at the first evaluation that reaches ``target_acc``. SFT
cycles through its subset's pool in a seeded order with a constant lr after a 10% warm-up.
Evaluations (greedy exact match on ``task.eval_set``) use the bf16 rounding of the weights,
which is what a saved checkpoint would score. Training runs on the model's device: batches are
drawn on the CPU (the same data on every device) and moved there; losses are read back only
where a curve records them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from rlvr_ray.lab import models, rollout, task
from rlvr_ray.lab.settings import LabSettings, RunSpec

SaveFn = Callable[[int, torch.nn.Module], None]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the fp32 master weights (fp32 moments), no fused/foreach kernels."""
    return torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, foreach=False
    )


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters."""
    return next(model.parameters()).device


def supervised_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: task.Problems, lr: float
) -> torch.Tensor:
    """One optimizer step of answer-token cross-entropy on ``batch``; returns the loss (a
    detached 0-d tensor on the model's device: reading it waits for the step)."""
    for group in opt.param_groups:
        group["lr"] = lr
    logp = rollout.token_logprobs(model, batch.prompts, batch.answers)
    loss = -logp.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


class Evaluator:
    """Greedy accuracy of the bf16 rounding of a master model on the shared eval set."""

    def __init__(self, s: LabSettings, config: object, device: torch.device | str = "cpu") -> None:
        self.problems = task.eval_set(s.n_digits, s.eval_size).to(device)
        self.shadow = models.new_model(config, seed=0, device=device)

    def __call__(self, master: torch.nn.Module) -> float:
        models.rollout_copy(master, self.shadow)
        return rollout.accuracy(self.shadow, self.problems)


def pretrain(
    model: torch.nn.Module, s: LabSettings, evaluate: Evaluator, seed: int
) -> list[dict[str, float]]:
    """Pretrain ``model`` in place until ``target_acc`` or ``pretrain_steps``; returns the curve."""
    gen = task.named_generator("pretrain", seed)
    device = device_of(model)
    opt = make_optimizer(model, s.pretrain_lr, weight_decay=0.1)
    warm = max(1, s.pretrain_steps // 20)
    curve: list[dict[str, float]] = []
    for step in range(1, s.pretrain_steps + 1):
        frac = max(0.0, (step - warm) / max(1, s.pretrain_steps - warm))
        lr = s.pretrain_lr * min(step / warm, 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        batch = task.sample_problems(s.pretrain_batch, s.n_digits, gen).to(device)
        loss = supervised_step(model, opt, batch, lr)
        if step % s.eval_every == 0 or step == s.pretrain_steps:
            acc = evaluate(model)
            curve.append({"step": step, "loss": float(loss), "lr": lr, "accuracy": acc})
            if acc >= s.target_acc:
                break
    return curve


def sft(
    model: torch.nn.Module, s: LabSettings, run: RunSpec, evaluate: Evaluator, save: SaveFn
) -> list[dict[str, float | None]]:
    """SFT ``model`` in place on ``run.dataset``'s correct answers; ``save`` at the save steps."""
    device = device_of(model)
    pool = task.subset(run.dataset, s.n_digits, s.pool_size).to(device)
    gen = task.named_generator(f"sft-order-{s.seed}", run.seed)  # CPU: the order on every device
    opt = make_optimizer(model, s.sft_lr, weight_decay=0.01)
    warm = max(1, s.sft_steps // 10)
    order = torch.randperm(len(pool), generator=gen).to(device)
    pos = 0
    save_at = set(s.save_steps(s.sft_steps))
    # losses stay on the device until the end of the run
    curve: list[dict[str, Any]] = [{"step": 0, "loss": None, "accuracy": evaluate(model)}]
    for step in range(1, s.sft_steps + 1):
        if pos + s.sft_batch > len(order):
            order, pos = torch.randperm(len(pool), generator=gen).to(device), 0
        batch = pool.take(order[pos : pos + s.sft_batch])
        pos += s.sft_batch
        loss = supervised_step(model, opt, batch, s.sft_lr * min(1.0, step / warm))
        evaluated = step % s.eval_every == 0 or step in save_at
        curve.append(
            {"step": step, "loss": loss, "accuracy": evaluate(model) if evaluated else None}
        )
        if step in save_at:
            save(step, model)
    losses = torch.stack([p["loss"] for p in curve[1:]]).tolist()  # one read for all steps
    for point, loss in zip(curve[1:], losses, strict=True):
        point["loss"] = loss
    return curve
