"""Loss terms on small hand-built tensors with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dssn.method import (
    labeled_ce,
    normalized_mse,
    ohem_ce,
    pixel_infonce,
    pseudo_label_ce,
    standardize_logits,
)

LOG2 = math.log(2.0)


def test_labeled_ce_means_over_non_ignored_pixels():
    logits = torch.zeros(1, 2, 1, 3)  # uniform over 2 classes: CE = log 2 everywhere
    logits[0, 0, 0, 2] = 10.0  # pixel 2 would be a large loss for class 1 ... but is ignored
    labels = torch.tensor([[[0, 1, 255]]])
    assert labeled_ce(logits, labels).item() == pytest.approx(LOG2)


def test_labeled_ce_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = labeled_ce(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def reference_ohem(logits, labels, thresh, min_kept):
    """A line-by-line transcription of the reference ``ProbOhemCrossEntropy2d.forward``
    (Python branches on tensor values and all): the oracle for the sync-free version."""
    b, c, h, w = logits.shape
    target = labels.reshape(-1).clone()
    valid = target.ne(255)
    target = target * valid.long()
    num_valid = valid.sum()
    prob = F.softmax(logits, dim=1).transpose(0, 1).reshape(c, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill_(~valid, 1)
        mask_prob = prob[target, torch.arange(len(target))]
        threshold = thresh
        if min_kept > 0:
            index = mask_prob.argsort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
            kept = mask_prob.le(threshold)
            target = target * kept.long()
            valid = valid * kept
    target = target.masked_fill_(~valid, 255).view(b, h, w)
    return F.cross_entropy(logits, target, ignore_index=255)


@pytest.mark.parametrize(
    ("thresh", "min_kept"),
    [(0.7, 10), (0.7, 200), (0.7, 1000), (0.3, 5), (0.99, 50), (0.7, 0)],
)
def test_ohem_matches_reference_transcription(thresh, min_kept):
    gen = torch.Generator().manual_seed(min_kept)
    logits = torch.randn(2, 5, 8, 9, generator=gen) * 2
    labels = torch.randint(0, 5, (2, 8, 9), generator=gen)
    labels[0, :3] = 255  # some ignored pixels
    expected = reference_ohem(logits, labels, thresh, min_kept)
    assert ohem_ce(logits, labels, thresh, min_kept).item() == pytest.approx(expected.item())


def test_ohem_keeps_only_hard_pixels():
    # true-class probabilities 0.9, 0.6, 0.2 (classes 0/1 logits); thresh 0.7, min_kept 1:
    # kth smallest = 0.2 < 0.7, so threshold 0.7 keeps the pixels at 0.6 and 0.2
    p = torch.tensor([0.9, 0.6, 0.2])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, 3)
    labels = torch.zeros(1, 1, 3, dtype=torch.long)
    expected = -(math.log(0.6) + math.log(0.2)) / 2
    assert ohem_ce(logits, labels, 0.7, 1).item() == pytest.approx(expected, rel=1e-6)
    # min_kept larger than the labeled pixel count: plain CE over all three
    plain = -(math.log(0.9) + math.log(0.6) + math.log(0.2)) / 3
    assert ohem_ce(logits, labels, 0.7, 4).item() == pytest.approx(plain, rel=1e-6)


def test_pseudo_label_ce_counts_selected_pixels_over_all_valid_ones():
    logits = torch.zeros(1, 2, 2, 2)  # CE = log 2 per pixel
    pseudo = torch.zeros(1, 2, 2, dtype=torch.long)
    selected = torch.tensor([[[True, True], [True, False]]])
    ignore = torch.tensor([[[0, 0], [255, 0]]])  # the third selected pixel is padding
    # numerator: 2 selected non-padding pixels; denominator: 3 non-padding pixels
    assert pseudo_label_ce(logits, pseudo, selected, ignore).item() == pytest.approx(2 * LOG2 / 3)


def test_pseudo_label_ce_uses_the_pseudo_labels():
    logits = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    ignore = torch.zeros(1, 1, 1, dtype=torch.long)
    selected = torch.ones(1, 1, 1, dtype=torch.bool)
    low = pseudo_label_ce(logits, torch.zeros(1, 1, 1, dtype=torch.long), selected, ignore)
    high = pseudo_label_ce(logits, torch.ones(1, 1, 1, dtype=torch.long), selected, ignore)
    assert low.item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert high.item() == pytest.approx(math.log(1 + math.exp(2)))


def test_normalized_mse_known_answer_and_gradient_into_both():
    a = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).requires_grad_()
    b = torch.tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1).requires_grad_()
    # unbiased std of (1, 2, 3) is 1: z_a = (-1, 0, 1), z_b = (1, 0, -1); MSE = 8 / 3
    assert normalized_mse(a, b).item() == pytest.approx(8 / 3)
    # (at that point z_a = -z_b, where the gradient vanishes: check it on another pair)
    c = torch.tensor([3.0, 1.0, 2.0]).view(1, 3, 1, 1).requires_grad_()
    normalized_mse(a, c).backward()
    assert a.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


def test_standardize_is_invariant_to_shift_and_scale_per_pixel():
    p = torch.randn(2, 5, 3, 3)
    shifted = p * 3.0 + torch.randn(2, 1, 3, 3)
    torch.testing.assert_close(standardize_logits(p), standardize_logits(shifted))
    assert normalized_mse(p, shifted).item() == pytest.approx(0.0, abs=1e-10)


def two_pixel_pair():
    """Branches a == b with two pixels (C = 3) whose centred logits have cosine -1/2."""
    a = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]]).view(1, 3, 1, 2)
    return a, a.clone()


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 2.0])
def test_infonce_known_answer(temperature):
    a, b = two_pixel_pair()
    # similarities [[1, -1/2], [-1/2, 1]] / T: each row's CE = log(1 + exp(-1.5 / T))
    expected = math.log1p(math.exp(-1.5 / temperature))
    got = pixel_infonce(a, b, temperature, 16).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_infonce_temperature_changes_the_loss():
    a, b = two_pixel_pair()
    b = b + 0.3 * torch.randn_like(b)
    assert pixel_infonce(a, b, 0.1, 16).item() != pytest.approx(pixel_infonce(a, b, 0.5, 16).item())


def test_infonce_negatives_span_the_batch_and_positive_matters():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 3, 3, generator=gen)
    aligned = pixel_infonce(a, a, 0.2, 64)
    shuffled = pixel_infonce(a, a.flip(0), 0.2, 64)  # positives swapped across images
    assert aligned < shuffled
    # negatives come from both images: the loss exceeds the one-image loss of the same pixels
    assert aligned > pixel_infonce(a[:1], a[:1], 0.2, 64)


def test_infonce_samples_pixels_and_gradient_flows():
    a = torch.randn(2, 4, 8, 8, requires_grad=True)
    b = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.manual_seed(0)
    loss = pixel_infonce(a, b, 0.1, 5)
    loss.backward()
    # 5 sampled positions per image: the same positions get gradient in both branches
    touched_a = a.grad.abs().sum(dim=1) > 0
    touched_b = b.grad.abs().sum(dim=1) > 0
    assert touched_a.flatten(1).sum(dim=1).tolist() == [5, 5]
    assert torch.equal(touched_a, touched_b)
