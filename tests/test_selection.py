"""Pseudo-label selection rules on small hand-built logits with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from dssn.config import DSSNConfig
from dssn.method import class_pass_count, select


def logits_from_probs(probs: list[list[list[float]]]) -> torch.Tensor:
    """Logits (1, C, 1, N) whose softmax over C is ``probs`` given as [pixel][class]."""
    p = torch.tensor(probs[0], dtype=torch.float64)  # (N, C)
    return p.log().T.unsqueeze(0).unsqueeze(2).float()  # (1, C, 1, N)


def test_dssn_rule_ratio_floor_and_strict_test():
    # class 0 peaks at 0.95 (> floor 0.92): threshold 0.96 * 0.95 = 0.912 -> pixels 0 and 1 pass
    # class 1 peaks at 0.90 (<= floor): threshold = its own max, strict test -> nothing passes
    probs = [[[0.95, 0.05], [0.93, 0.07], [0.90, 0.10], [0.10, 0.90]]]
    cfg = DSSNConfig(selection="dssn")
    assert select(logits_from_probs(probs), cfg).tolist() == [[[True, True, False, False]]]
    # a lower floor lets class 1 in (threshold 0.96 * 0.90 = 0.864)
    low = DSSNConfig(selection="dssn", select_floor=0.85)
    assert select(logits_from_probs(probs), low).tolist() == [[[True, True, False, True]]]
    counts = class_pass_count(logits_from_probs(probs), 0.96, 0.85)
    assert counts.dtype == torch.int64 and counts.tolist() == [[[1, 1, 0, 1]]]


def test_dssn_thresholds_are_per_image():
    # image 0: class 0 is sure somewhere; image 1: the same pixel values scaled down (unsure)
    sure = torch.tensor([[4.0, 3.0, 0.0], [0.0, 0.0, 0.0]])  # (C=2, N=3)
    logits = torch.stack([sure, sure * 0.3]).unsqueeze(2)  # (2, 2, 1, 3)
    selected = select(logits, DSSNConfig(selection="dssn"))
    assert selected[0].any() and not selected[1].any()


def test_topk_keeps_top_fraction_per_image_and_class():
    # argmax: pixels 0-3 class 0 (conf .9 .8 .7 .6), pixels 4-5 class 1 (conf .99 .55)
    probs = [
        [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.01, 0.99], [0.45, 0.55]],
    ]
    half = select(logits_from_probs(probs), DSSNConfig(selection="topk", topk_ratio=0.5))
    assert half.tolist() == [[[True, True, False, False, True, False]]]
    quarter = select(logits_from_probs(probs), DSSNConfig(selection="topk", topk_ratio=0.25))
    # class 0: 0.25 * 4 = 1 pixel; class 1: 0.25 * 2 = 0.5 -> rounds to 1 (at least one)
    assert quarter.tolist() == [[[True, False, False, False, True, False]]]
    everything = select(logits_from_probs(probs), DSSNConfig(selection="topk", topk_ratio=1.0))
    assert everything.all()


def test_topk_ranks_within_each_image_separately():
    conf = torch.tensor([[3.0, 2.0, 1.0, 0.5]])  # class 0 logit per pixel; class 1 logit = 0
    image = torch.cat([conf, torch.zeros_like(conf)]).unsqueeze(1)  # (C=2, 1, N=4)
    logits = torch.stack([image, image.flip(-1)])  # (2, 2, 1, 4): image 1 reversed
    selected = select(logits, DSSNConfig(selection="topk", topk_ratio=0.5))
    assert selected[0].tolist() == [[True, True, False, False]]
    assert selected[1].tolist() == [[False, False, True, True]]


def test_topk_handles_float_error_in_ratio_times_count():
    # 0.3 * 10 is 3.0000000000000004 in floating point: still exactly 3 pixels kept
    logits = torch.linspace(1, 5, 10).view(1, 1, 1, 10)
    logits = torch.cat([logits, torch.zeros_like(logits)], dim=1)  # every pixel class 0
    selected = select(logits, DSSNConfig(selection="topk", topk_ratio=0.3))
    assert selected.sum().item() == 3
    assert selected[0, 0, -3:].all()  # the three most confident pixels


def test_threshold_is_strict_and_global():
    probs = [[[0.96, 0.04], [0.95, 0.05], [0.30, 0.70], [0.02, 0.98]]]
    selected = select(logits_from_probs(probs), DSSNConfig(selection="threshold", threshold=0.95))
    assert selected.tolist() == [[[True, False, False, True]]]


def test_none_selects_every_pixel():
    logits = torch.randn(2, 3, 4, 5)
    selected = select(logits, DSSNConfig(selection="none"))
    assert selected.shape == (2, 4, 5) and selected.dtype == torch.bool and selected.all()


@pytest.mark.parametrize("rule", ["dssn", "topk", "threshold", "none"])
def test_every_rule_returns_a_bool_mask_without_gradient(rule):
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    selected = select(logits, DSSNConfig(selection=rule))
    assert selected.shape == (2, 5, 6) and selected.dtype == torch.bool
    assert not selected.requires_grad


def test_unknown_rule_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="dssn.selection"):
        select(torch.randn(1, 2, 2, 2), DSSNConfig(selection="bogus"))


def test_logits_from_probs_helper_roundtrips():
    probs = [[[0.25, 0.75]]]
    q = logits_from_probs(probs).softmax(dim=1).flatten().tolist()
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(q, [0.25, 0.75], strict=True))
