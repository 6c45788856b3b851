"""Optimizer groups and the poly learning-rate decay (METHOD.md step 8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dssn.config import OptimConfig
from dssn.train.schedule import build_optimizer, poly_factor, set_poly_lr


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        return self.head.parameters()


def test_sgd_groups_follow_the_reference():
    opt = build_optimizer(_Net(), OptimConfig(lr=0.002, lr_multi=10.0))
    assert isinstance(opt, torch.optim.SGD)
    backbone, head = opt.param_groups
    assert backbone["lr"] == 0.002 and head["lr"] == pytest.approx(0.02)
    assert backbone["momentum"] == 0.9 and backbone["weight_decay"] == 1e-4
    assert len(backbone["params"]) == 2 and len(head["params"]) == 2


def test_adamw_option():
    opt = build_optimizer(_Net(), OptimConfig(optimizer="adamw", lr=1e-3, lr_multi=1.0))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]


def test_parameters_outside_both_groups_are_an_error():
    net = _Net()
    net.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="exactly one group"):
        build_optimizer(net, OptimConfig())


def test_poly_decay_after_each_step():
    opt = build_optimizer(_Net(), OptimConfig(lr=0.01, lr_multi=10.0))
    total = 4
    # after the step with index 0 the rate is still the base rate (reference: iters = 0)
    assert set_poly_lr(opt, 0, total, 0.9) == pytest.approx(0.01)
    lr = set_poly_lr(opt, 2, total, 0.9)
    assert lr == pytest.approx(0.01 * 0.5**0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5**0.9)
    assert poly_factor(total, total, 0.9) == 0.0 and poly_factor(total + 3, total, 0.9) == 0.0
