"""Sampling, greedy evaluation and per-token log-probabilities for the lab's causal LMs.

Answers have a fixed length (``task``), so generation is a plain loop of full forwards (13
tokens at most: a KV cache would not pay) and sampling draws from an explicit
``torch.Generator``, which makes rollouts reproducible bit for bit on a given machine and
thread count. Tensors stay on the device of the model and the prompts; a sampling generator
lives on that device too (``task.named_generator(..., device=...)``).
"""

from __future__ import annotations

import torch

from rlvr_ray.lab.task import Problems, exact_match


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    answer_len: int,
    gen: torch.Generator | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Complete ``prompts`` (LongTensor[N, P]) with ``answer_len`` tokens -> LongTensor[N, A].

    ``gen=None`` decodes greedily; otherwise tokens are sampled at ``temperature`` from ``gen``.
    """
    was_training = model.training
    model.eval()
    ids = prompts
    for _ in range(answer_len):
        logits = model(input_ids=ids).logits[:, -1, :].float()
        if gen is None:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return ids[:, prompts.shape[1] :]


def token_logprobs(
    model: torch.nn.Module, prompts: torch.Tensor, completions: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of ``completions`` given ``prompts`` -> FloatTensor[N, A] (with grad)."""
    ids = torch.cat([prompts, completions], dim=1)
    logits = model(input_ids=ids[:, :-1]).logits[:, prompts.shape[1] - 1 :, :].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, problems: Problems, batch: int = 512) -> float:
    """Greedy exact-match accuracy of ``model`` on ``problems`` (a float in [0, 1])."""
    device = problems.prompts.device
    hits = torch.zeros((), dtype=torch.long, device=device)  # read once, at the end
    for start in range(0, len(problems), batch):
        part = problems.take(torch.arange(start, min(start + batch, len(problems)), device=device))
        out = generate(model, part.prompts, part.answers.shape[1], gen=None)
        hits += exact_match(out, part.answers).sum().long()
    return int(hits) / len(problems)
