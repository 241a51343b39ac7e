"""The lab's task: token layout and the verifiable exact-match reward on hand-made examples."""

import torch

from rlvr_ray.lab import task


def test_problem_tokens_spell_the_sum():
    p = task.make_problems(torch.tensor([123, 7]), torch.tensor([456, 995]), n_digits=3)
    assert task.decode(p.prompts[0]) == "<bos>123+456="
    assert task.decode(p.answers[0]) == "0579"
    assert task.decode(p.prompts[1]) == "<bos>007+995="
    assert task.decode(p.answers[1]) == "1002"


def test_exact_match_reward_on_hand_made_completions():
    answers = torch.tensor([task.encode("0579")] * 4)
    completions = torch.tensor(
        [task.encode("0579"), task.encode("0578"), task.encode("5790"), task.encode("0+79")]
    )
    assert task.exact_match(completions, answers).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_subsets_are_fixed_and_distinct():
    a1, a2 = task.subset("arith-a", 3, 64), task.subset("arith-a", 3, 64)
    b = task.subset("arith-b", 3, 64)
    assert torch.equal(a1.prompts, a2.prompts)
    assert not torch.equal(a1.prompts, b.prompts)
    sums = [int(task.decode(row)) for row in a1.answers]
    assert sums == (a1.a + a1.b).tolist()
