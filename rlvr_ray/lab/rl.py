"""On-policy RL with a verifiable reward: GRPO, DAPO-style and REINFORCE++-style updates.

Each step samples ``prompts_per_step`` prompts from the run's data subset and ``group_size``
answers per prompt from the bf16 rounding of the current fp32 master (the rollout engine
serves bf16, as vLLM does), scores them by exact match, computes advantages, then takes
``minibatches`` PPO-style optimizer steps on the fp32 master, the importance ratio measured
against the master's log-probs before the first of them.

- ``grpo``: group-relative advantages (r - mean_g) / (std_g + eps) (unbiased std, as verl),
  symmetric ratio clip ``clip_low``, plus ``kl_coef`` x k3-KL to the reference (the bf16 base)
  in the loss.
- ``dapo``: same advantages; clip-higher (1 - clip_low, 1 + clip_high); no KL term; dynamic
  sampling: groups whose rewards are all equal are dropped and more rollout batches are drawn
  (up to ``max_gen_batches``) until ``prompts_per_step`` groups are kept.
- ``reinforce++``: the "baseline" variant: score minus its group mean as the terminal reward,
  a per-token KL penalty -kl_coef x (log pi - log pi_ref) in the reward, returns summed to the
  end, then whitened over the whole batch (global normalisation); symmetric clip, no KL loss.

Losses are token means (all answers have the same length, so this equals the sequence mean).
Everything runs on the master's device; the prompt order comes from a CPU generator (the same
order on every device), the samples from a generator on the device (on the CPU the same one).
Between evaluations a step reads nothing back from the device but DAPO's dynamic-sampling
counts; the curve's rewards and KLs are read at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr_ray.lab import models, rollout, task, train
from rlvr_ray.lab.settings import LabSettings, RunSpec

ALGORITHMS = ("grpo", "dapo", "reinforce++")
EPS = 1e-6


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO advantages: FloatTensor[P, G] rewards -> (r - mean_g) / (std_g + 1e-6), same shape."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + EPS)


def keep_informative(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic-sampling filter: BoolTensor[P], False for groups whose rewards all equal."""
    return (rewards != rewards[:, :1]).any(dim=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def reinforce_pp_advantages(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """REINFORCE++-baseline token advantages.

    ``scores``: FloatTensor[P, G]; ``logp``, ``ref_logp``: FloatTensor[P * G, A] (rows ordered
    group by group) -> FloatTensor[P * G, A], whitened over every token of the batch.
    """
    rewards = -kl_coef * (logp - ref_logp)
    rewards[:, -1] += (scores - scores.mean(dim=1, keepdim=True)).reshape(-1)
    returns = rewards.flip(1).cumsum(1).flip(1)
    return (returns - returns.mean()) / (returns.std() + EPS)


def clipped_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """PPO clipped surrogate, token mean: all FloatTensor[N, A] -> scalar to minimise."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)
    return -surrogate.mean()


@dataclass
class Batch:
    """One step's training data: G consecutive rows per prompt."""

    prompts: torch.Tensor  # LongTensor[P * G, prompt_len]
    completions: torch.Tensor  # LongTensor[P * G, A]
    rewards: torch.Tensor  # FloatTensor[P, G]


class Sampler:
    """Draws rollout batches from a subset pool with a run-seeded order and generator."""

    def __init__(self, s: LabSettings, run: RunSpec, device: torch.device | str = "cpu") -> None:
        self.s = s
        self.device = torch.device(device)
        self.pool = task.subset(run.dataset, s.n_digits, s.pool_size).to(self.device)
        name = f"rl-{run.algorithm}-{s.seed}"
        self.gen = task.named_generator(name, run.seed)
        # sampling draws from a generator on the device; on the CPU it is the order's own
        on_cpu = self.device.type == "cpu"
        self.sample_gen = self.gen if on_cpu else task.named_generator(name, run.seed, self.device)
        self.order = self._permutation()
        self.pos = 0

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.pool), generator=self.gen).to(self.device)

    def __call__(self, policy: torch.nn.Module) -> Batch:
        s = self.s
        if self.pos + s.prompts_per_step > len(self.order):
            self.order, self.pos = self._permutation(), 0
        idx = self.order[self.pos : self.pos + s.prompts_per_step]
        self.pos += s.prompts_per_step
        probs = self.pool.take(idx.repeat_interleave(s.group_size))
        out = rollout.generate(
            policy, probs.prompts, probs.answers.shape[1], self.sample_gen, s.temperature
        )
        rewards = task.exact_match(out, probs.answers).view(-1, s.group_size)
        return Batch(probs.prompts, out, rewards)


def dynamic_sample(sample: Callable[[], Batch], wanted: int, tries: int) -> tuple[Batch, float]:
    """DAPO: keep informative groups from up to ``tries`` batches; returns (batch, first mean)."""
    kept: list[Batch] = []
    n = 0
    first_mean = float("nan")
    for i in range(tries):
        b = sample()
        if i == 0:
            first_mean = float(b.rewards.mean())
        keep = keep_informative(b.rewards)
        g = b.rewards.shape[1]
        rows = keep.repeat_interleave(g)
        kept.append(Batch(b.prompts[rows], b.completions[rows], b.rewards[keep]))
        n += int(keep.sum())
        if n >= wanted:
            break
    rewards = torch.cat([k.rewards for k in kept])[:wanted]
    rows = rewards.shape[0] * rewards.shape[1]
    prompts = torch.cat([k.prompts for k in kept])[:rows]
    return Batch(prompts, torch.cat([k.completions for k in kept])[:rows], rewards), first_mean


def advantages(
    algorithm: str, batch: Batch, old_logp: torch.Tensor, ref_logp: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Token advantages FloatTensor[N, A] of ``batch`` under ``algorithm``."""
    if algorithm == "reinforce++":
        return reinforce_pp_advantages(batch.rewards, old_logp, ref_logp, kl_coef)
    adv = group_advantages(batch.rewards).reshape(-1, 1)
    return adv.expand_as(old_logp)


def update(
    master: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    adv: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    run: RunSpec,
    s: LabSettings,
) -> torch.Tensor:
    """The step's minibatch optimizer updates; returns each minibatch's mean k3-KL to the
    reference (FloatTensor[minibatches], on the device: read when the curve is written)."""
    high = s.clip_high if run.algorithm == "dapo" else s.clip_low
    kls = []
    for rows in torch.arange(adv.shape[0], device=adv.device).chunk(s.minibatches):
        logp = rollout.token_logprobs(master, batch.prompts[rows], batch.completions[rows])
        loss = clipped_loss(logp, old_logp[rows], adv[rows], s.clip_low, high)
        kl = kl_k3(logp, ref_logp[rows]).mean()
        if run.algorithm == "grpo":
            loss = loss + s.kl_coef * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
        opt.step()
        kls.append(kl.detach())
    return torch.stack(kls)


def rl_train(
    master: torch.nn.Module,
    ref: torch.nn.Module,
    s: LabSettings,
    run: RunSpec,
    evaluate: train.Evaluator,
    save: train.SaveFn,
) -> list[dict[str, float | int | None]]:
    """Run ``run`` on ``master`` in place (``ref``: the frozen base); returns the reward curve."""
    if run.algorithm not in ALGORITHMS:
        raise ValueError(f"run {run.name}: unknown RL algorithm {run.algorithm!r}")
    device = train.device_of(master)
    sampler = Sampler(s, run, device)
    policy = models.new_model(master.config, seed=0, device=device)
    opt = train.make_optimizer(master, s.rl_lr, weight_decay=0.01)
    save_at = set(s.save_steps(s.rl_steps))
    curve: list[dict[str, float | int | None]] = [
        {"step": 0, "mean_reward": None, "accuracy": evaluate(master)}
    ]
    for step in range(1, s.rl_steps + 1):
        models.rollout_copy(master, policy)
        if run.algorithm == "dapo":
            batch, mean_reward = dynamic_sample(
                lambda: sampler(policy), s.prompts_per_step, s.max_gen_batches
            )
        else:
            batch = sampler(policy)
            mean_reward = batch.rewards.mean()  # read at the end of the run
        point: dict[str, float | int | None] = {"step": step, "mean_reward": mean_reward}
        point["groups"] = int(batch.rewards.shape[0])
        if batch.rewards.shape[0]:
            with torch.no_grad():
                old_logp = rollout.token_logprobs(master, batch.prompts, batch.completions)
                ref_logp = rollout.token_logprobs(ref, batch.prompts, batch.completions)
            adv = advantages(run.algorithm, batch, old_logp, ref_logp, s.kl_coef)
            point["kl"] = update(master, opt, batch, adv, old_logp, ref_logp, run, s)
        evaluated = step % s.eval_every == 0 or step in save_at
        point["accuracy"] = evaluate(master) if evaluated else None
        curve.append(point)
        if step in save_at:
            save(step, master)
    _read_back(curve)
    return curve


def _read_back(curve: list[dict]) -> None:
    """Replace the curve's device tensors by floats, in place: the mean reward as is, the KL
    as the mean of its minibatches' values; two reads from the device for the whole run."""
    rewarded = [p for p in curve[1:] if isinstance(p["mean_reward"], torch.Tensor)]
    if rewarded:
        values = torch.stack([p["mean_reward"] for p in rewarded]).tolist()
        for point, value in zip(rewarded, values, strict=True):
            point["mean_reward"] = value
    updated = [p for p in curve[1:] if "kl" in p]
    if updated:
        values = torch.stack([p["kl"] for p in updated]).tolist()
        for point, kls in zip(updated, values, strict=True):
            point["kl"] = sum(kls) / len(kls)
