"""Parity with the reference code: selection rule and loss block on the official fixture.

The fixture holds inputs and outputs of the DSSN reference implementation's own code
(``get_adaptive_binary_mask`` and the loss block of its VOC training loop) on fixed random
tensors; see METHOD.md "Parity fixture".
"""

from __future__ import annotations

import pytest
import torch

from dssn.config import Config
from dssn.method import StepOutputs, class_pass_count, loss_block, select

TOLERANCE = 1e-5  # the bar for every expected value

# our metric name -> the reference's name (expected_<name> in the fixture)
TERMS = {
    "loss_x": "loss_x",
    "loss_s1": "loss_u_s1",
    "loss_s2": "loss_u_s2",
    "loss_fa": "loss_u_w_fp",
    "loss_fb": "loss_u_w_Fp",
    "loss_img": "loss_u_s_mse",
    "loss_feat": "loss_u_fp_mse",
    "mask_ratio": "mask_ratio",
}
MAPS = (
    "pseudo_label_s1",
    "pseudo_label_s2",
    "ignore_s1",
    "ignore_s2",
    "selected_s1",
    "selected_s2",
    "selected_w",
)


@pytest.fixture(scope="module")
def fixture(parity_path) -> dict[str, torch.Tensor]:
    data = torch.load(parity_path, weights_only=True)
    print("parity fixture keys:", sorted(data))
    return data


@pytest.fixture(scope="module")
def outputs(fixture) -> StepOutputs:
    def get(name: str) -> torch.Tensor:
        return fixture["step_" + name]

    return StepOutputs(
        labeled=get("pred_x"),
        labels=get("mask_x"),
        weak=get("pred_u_w"),
        perturbed=(get("pred_u_w_fp"), get("pred_u_w_Fp")),
        strong=(get("pred_u_s1"), get("pred_u_s2")),
        teacher=get("preds_tea"),
        teacher_mix=get("pred_u_w_mix_tea"),
        boxes=(get("cutmix_box1"), get("cutmix_box2")),
        ignore=get("ignore_mask"),
        ignore_mix=get("ignore_mask_mix"),
    )


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}"
    )


def test_selection_count_and_mask_match_reference(fixture):
    cfg = Config().dssn
    for logits, count in zip(fixture["selection_logits"], fixture["selection_count"], strict=True):
        assert torch.equal(class_pass_count(logits, cfg.select_ratio, cfg.select_floor), count)
        assert torch.equal(select(logits, cfg), count > 0)
    # the fixture is not trivial: some pixels pass, most do not
    assert 0 < (fixture["selection_count"] > 0).float().mean() < 0.5


@pytest.mark.parametrize("term", sorted(TERMS))
def test_each_loss_term_matches_reference(outputs, fixture, term):
    _, metrics, _ = loss_block(outputs, Config(), skip_strong=False)
    _close(metrics[term], fixture["expected_" + TERMS[term]], term)


def test_totals_match_reference(outputs, fixture):
    loss, _, _ = loss_block(outputs, Config(), skip_strong=False)
    first, _, _ = loss_block(outputs, Config(), skip_strong=True)
    _close(loss, fixture["expected_loss"], "loss")
    _close(first, fixture["expected_loss_first_iter"], "loss_first_iter")
    assert not torch.isclose(loss, first)  # the first-iteration rule changes the total


@pytest.mark.parametrize("name", MAPS)
def test_pseudo_labels_ignore_and_selected_masks_match_reference(outputs, fixture, name):
    _, _, maps = loss_block(outputs, Config(), skip_strong=False)
    expected = fixture["expected_" + name]
    assert maps[name].shape == expected.shape
    assert torch.equal(maps[name].to(expected.dtype), expected), name


def test_ema_keep_rate_is_the_config_default(fixture):
    assert Config().dssn.ema == pytest.approx(fixture["ema_keep_rate"].item())
