"""The lab's verifiable task: fixed-width addition with an exact-match reward.

A problem is ``<bos> a + b =`` with both operands written in ``n_digits`` zero-padded decimal
digits; the answer is ``a + b`` in ``n_digits + 1`` zero-padded digits, so every prompt and every
answer has the same length and batches need no padding. The reward is 1.0 when the sampled
answer tokens spell the right sum and 0.0 otherwise, so it can be checked exactly (RLVR).

Data subsets (``arith-a``, ``arith-b``, ...) are fixed pools of problems drawn from a generator
seeded by the subset's name, so two runs on different subsets see different prompts and two runs
on the same subset see the same pool (in an order set by the run's seed).

Pure torch; no transformers. Problems are drawn on the CPU from CPU generators (the same data
on every device) and moved to the training device with ``Problems.to``; tokens and rewards are
computed on the device of their inputs. Shapes: prompts are ``LongTensor[N, prompt_len]``, answers and
completions ``LongTensor[N, answer_len]``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 13, 14
DIGIT0 = 3  # token id of "0"; digits are 3..12
VOCAB = ["<pad>", "<bos>", "<eos>", *"0123456789", "+", "=", "<unk>"]
VOCAB_SIZE = len(VOCAB)  # 16


@dataclass(frozen=True)
class Problems:
    """A batch of problems: operands ``a``, ``b`` (LongTensor[N]) and their token forms."""

    a: torch.Tensor
    b: torch.Tensor
    prompts: torch.Tensor  # LongTensor[N, 2 * n_digits + 3]
    answers: torch.Tensor  # LongTensor[N, n_digits + 1]

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def take(self, idx: torch.Tensor) -> Problems:
        """Rows ``idx`` (LongTensor[K]) of this batch."""
        return Problems(self.a[idx], self.b[idx], self.prompts[idx], self.answers[idx])

    def to(self, device: torch.device | str) -> Problems:
        """This batch with every tensor on ``device`` (itself when already there)."""
        return Problems(*(t.to(device) for t in (self.a, self.b, self.prompts, self.answers)))


def digits(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-padded decimal digit tokens of ``x`` (LongTensor[N]) -> LongTensor[N, width]."""
    powers = 10 ** torch.arange(width - 1, -1, -1, dtype=torch.long, device=x.device)
    return (x[:, None] // powers) % 10 + DIGIT0


def make_problems(a: torch.Tensor, b: torch.Tensor, n_digits: int) -> Problems:
    """Token forms of ``a + b`` for operand tensors ``a``, ``b`` (LongTensor[N])."""
    n = a.shape[0]
    col = torch.full((n, 1), 0, dtype=torch.long, device=a.device)
    prompts = torch.cat(
        [col + BOS, digits(a, n_digits), col + PLUS, digits(b, n_digits), col + EQUALS], dim=1
    )
    return Problems(a, b, prompts, digits(a + b, n_digits + 1))


def sample_problems(n: int, n_digits: int, gen: torch.Generator) -> Problems:
    """``n`` problems with operands uniform in [0, 10**n_digits), drawn from ``gen``."""
    hi = 10**n_digits
    a = torch.randint(0, hi, (n,), generator=gen)
    b = torch.randint(0, hi, (n,), generator=gen)
    return make_problems(a, b, n_digits)


def named_generator(
    name: str, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on ``device`` (default the CPU) seeded by a stable hash of ``name``, ``seed``."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{name}:{seed}".encode()))


def subset(name: str, n_digits: int, size: int) -> Problems:
    """The fixed pool of ``size`` problems called ``name`` (e.g. ``arith-a``)."""
    return sample_problems(size, n_digits, named_generator(name))


def eval_set(n_digits: int, size: int) -> Problems:
    """The held-out evaluation problems (its own named pool, shared by every run)."""
    return subset("eval", n_digits, size)


def exact_match(completions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Verifiable reward: 1.0 where a completion equals its answer token for token.

    ``completions``, ``answers``: LongTensor[N, answer_len] -> FloatTensor[N].
    """
    if completions.shape != answers.shape:
        raise ValueError(
            f"completions {tuple(completions.shape)} vs answers {tuple(answers.shape)}"
        )
    return (completions == answers).all(dim=1).float()


def encode(text: str) -> list[int]:
    """Token ids of ``text`` written with the lab vocabulary's characters (digits, +, =)."""
    return [VOCAB.index(ch) for ch in text]


def decode(ids: list[int] | torch.Tensor) -> str:
    """Readable text of token ids (special tokens in angle brackets)."""
    return "".join(VOCAB[int(i)] for i in ids)
