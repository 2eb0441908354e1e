"""The shared training step (nanorlcd/optim.py): schedules against hand formulas, accumulation ==
one batch."""
import math

import pytest
import torch

from nanorlcd.optim import lr_at, micro_steps, optimizer_step


def test_lr_at_warmup_then_cosine_matches_hand_formula():
    # warmup 2 of 10 steps to lr 1: 0.5, 1.0, then 0.5 * (1 + cos(pi * (s - 2) / 8))
    got = [lr_at(s, 10, 1.0, warmup_steps=2) for s in range(10)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert got == pytest.approx(want)


def test_lr_at_linear_and_floor():
    assert ([lr_at(s, 4, 2.0, decay="linear") for s in range(4)]
            == pytest.approx([2.0, 1.5, 1.0, 0.5]))
    assert lr_at(10, 10, 1.0, decay="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(3, 10, 1.0, decay="constant") == 1.0
    with pytest.raises(ValueError, match="decay"):
        lr_at(0, 10, 1.0, decay="step")


def test_accumulated_micro_steps_equal_one_full_batch_step():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    nets = [torch.nn.Linear(3, 1) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(n.parameters(), lr=0.1) for n in nets]
    # full batch in one backward
    ((nets[0](x).squeeze(-1) - y) ** 2).mean().backward()
    g0 = optimizer_step(opts[0], list(nets[0].parameters()), 1e9)
    # four micro-steps of two rows, each loss divided by the whole batch's size
    for i, ctx in micro_steps(nets[1], 4):
        with ctx:
            xb, yb = x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]
            (((nets[1](xb).squeeze(-1) - yb) ** 2).sum() / 8).backward()
    g1 = optimizer_step(opts[1], list(nets[1].parameters()), 1e9)
    assert float(g0) == pytest.approx(float(g1), rel=1e-5)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)
        assert a.grad is None and b.grad is None          # zeroed for the next step
