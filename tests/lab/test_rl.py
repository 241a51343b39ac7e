"""RL pieces against hand computations: advantages, DAPO's filter, KL, the clipped loss."""

import math

import pytest
import torch

from rlvr_ray.lab import rl


def test_group_advantages_match_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    adv = rl.group_advantages(rewards)
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: mean 0.75, std 0.5; group 2: all zero
    s0 = math.sqrt(1 / 3)
    assert adv[0].tolist() == pytest.approx([0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], rel=1e-5)
    assert adv[1].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], rel=1e-5)
    assert adv[2].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_dapo_filter_drops_all_equal_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert rl.keep_informative(rewards).tolist() == [False, False, True, True]


def test_dynamic_sample_keeps_informative_groups_across_batches():
    g = 2
    batches = iter(
        [
            rl.Batch(
                torch.arange(6).view(6, 1),
                torch.arange(6).view(6, 1),
                torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]),
            ),
            rl.Batch(
                torch.arange(6, 12).view(6, 1),
                torch.arange(6, 12).view(6, 1),
                torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]),
            ),
        ]
    )
    batch, first_mean = rl.dynamic_sample(lambda: next(batches), wanted=2, tries=3)
    assert first_mean == pytest.approx(0.5)
    assert batch.rewards.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert batch.prompts.view(-1).tolist() == [2, 3, 6, 7]
    assert batch.completions.shape == (2 * g, 1)


def test_k3_kl_is_zero_on_equal_policies_and_positive_otherwise():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    assert rl.kl_k3(logp, logp).abs().max() == 0
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    d = ref - logp
    assert torch.allclose(rl.kl_k3(logp, ref), d.exp() - d - 1)
    assert (rl.kl_k3(logp, ref) > 0).all()


def test_clipped_loss_clips_the_ratio_asymmetrically():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    # token 0: min(1.5, 1.28) = 1.28; token 1: min(-1.5, -1.28) = -1.5; token 2: min(-0.5, -0.8)
    expected = -(1.28 - 1.5 - 0.8) / 3
    assert float(rl.clipped_loss(logp, old, adv, 0.2, 0.28)) == pytest.approx(expected, rel=1e-6)


def test_reinforce_pp_advantages_match_hand_computation():
    scores = torch.tensor([[1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0], [-1.0, -0.5]])
    # per-token reward -0.1 * (logp - ref): [[-0.05, 0], [0, 0.05]]; terminal += score - 0.5
    returns = torch.tensor([[-0.05 + 0.5, 0.5], [0.05 - 0.5, 0.05 - 0.5]])
    expected = (returns - returns.mean()) / (returns.std() + rl.EPS)
    got = rl.reinforce_pp_advantages(scores, logp, ref, kl_coef=0.1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.mean().abs() < 1e-6
