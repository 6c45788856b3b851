"""Evaluation: confusion matrix, IoU, the three inference modes, on tiny known cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dssn.config import Config
from dssn.train.evaluate import (
    center_crop,
    class_probabilities,
    evaluate,
    segment,
    sliding_window_scores,
    window_starts,
)
from dssn.train.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_confusion_matrix_counts_and_ignores():
    target = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 2, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=3)
    # rows = target, cols = prediction; the 255 pixel is not counted
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert cm.dtype == torch.long


def test_iou_by_hand():
    cm = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 2]])
    ious = iou_per_class(cm)
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 2 / (3 + 2 - 2)
    assert ious == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert mean_iou(ious) == pytest.approx(5 / 9)
    assert pixel_accuracy(cm) == pytest.approx(5 / 7)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = torch.tensor([[3, 0, 0], [0, 1, 0], [0, 0, 0]])
    ious = iou_per_class(cm)
    assert ious[:2] == [1.0, 1.0] and math.isnan(ious[2])
    assert mean_iou(ious) == 1.0
    # a class that is predicted but never present has IoU 0 and does count
    cm = torch.tensor([[3, 0, 1], [0, 1, 0], [0, 0, 0]])
    assert iou_per_class(cm)[2] == 0.0
    assert mean_iou(iou_per_class(cm)) == pytest.approx((0.75 + 1 + 0) / 3)


def test_label_outside_the_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="class 7, outside"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 255]), 3)


def test_window_starts_follow_the_reference_loop():
    # reference: row = 0; while row < h: ...; row += int(grid * 2 / 3)
    assert window_starts(10, 4) == [0, 4, 8]
    assert window_starts(8, 4) == [0, 4]
    assert window_starts(3, 4) == [0]


class _Recorder(nn.Module):
    """Zero logits, recording every input window's shape."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes, self.calls = num_classes, []

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return x.new_zeros(x.shape[0], self.num_classes, *x.shape[-2:])


def test_sliding_window_sums_softmax_over_overlaps():
    model = _Recorder(num_classes=2)  # zero logits -> softmax 0.5 everywhere
    image = torch.zeros(1, 3, 7, 5)
    scores = sliding_window_scores(model, image, window=3, stride=2)
    # rows start at 0, 2, 4, 6; cols at 0, 2, 4; windows clipped at the border
    assert model.calls == [
        (3, 3), (3, 3), (3, 1),
        (3, 3), (3, 3), (3, 1),
        (3, 3), (3, 3), (3, 1),
        (1, 3), (1, 3), (1, 1),
    ]  # fmt: skip
    coverage = scores[0, 0] / 0.5  # how many windows covered each pixel
    rows = torch.tensor([1, 1, 2, 1, 2, 1, 2]).view(7, 1)
    cols = torch.tensor([1, 1, 2, 1, 2]).view(1, 5)
    assert torch.equal(coverage, (rows * cols).float())


def test_sliding_window_argmax_of_summed_probabilities():
    class Left(nn.Module):  # favours class 1 left of column 3, with a confidence by position
        def forward(self, x):
            w = x.shape[-1]
            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 1, :, : min(w, 2)] = 4.0
            return logits

    image = torch.zeros(1, 3, 4, 6)
    pred, _ = segment(Left(), image, "sliding_window", crop=3, stride_ratio=2 / 3)
    # windows start at cols 0, 2, 4 and each marks its first two columns as class 1
    assert pred[0, 0].tolist() == [1, 1, 1, 1, 1, 1]
    pred, _ = segment(Left(), image, "original", crop=3, stride_ratio=2 / 3)
    assert pred[0, 0].tolist() == [1, 1, 0, 0, 0, 0]


def test_sliding_window_probabilities_are_means_over_the_covering_windows():
    """For a per-pixel model every window gives a pixel the same softmax, so the window mean
    is that softmax (the sum is 1-4 times it, as windows overlap)."""
    model = nn.Conv2d(3, 4, 1)
    image = torch.randn(1, 3, 7, 5)
    probs = class_probabilities(model, image, "sliding_window", crop=3, stride_ratio=2 / 3)
    torch.testing.assert_close(probs, model(image).softmax(dim=1))


class _BySize(nn.Module):
    """Spatially constant logits chosen by the input's width; records (H, W) and mirroring."""

    def __init__(self, logits: dict[int, list[float]]):
        super().__init__()
        self.logits, self.calls = logits, []

    def forward(self, x):
        self.calls.append((*x.shape[-2:], bool(x[0, 0, 0, 0] < x[0, 0, 0, -1])))
        value = torch.tensor(self.logits[x.shape[-1]]).view(1, -1, 1, 1)
        return value.expand(x.shape[0], -1, *x.shape[-2:])


def test_test_time_scales_and_flips_add_class_probabilities():
    """Probabilities add, not logits and not votes: logit margins 6, -1.5, -1.5 at the scales
    1, 0.5, 1.5 sum to +3 (class 0), their probability margins to 0.995 - 2 x 0.635 < 0
    (class 1); margins 6, -0.5, -0.5 lose the vote 1:2 but win the probabilities (class 0)."""
    image = torch.linspace(0, 1, 40).expand(1, 3, 30, 40).contiguous()  # brighter rightwards
    scales = (1.0, 0.5, 1.5)
    model = _BySize({40: [6.0, 0.0], 20: [0.0, 1.5], 60: [0.0, 1.5]})
    pred, _ = segment(model, image, "original", 8, 2 / 3)
    assert pred.shape == (1, 30, 40) and pred.unique().tolist() == [0]
    pred, _ = segment(model, image, "original", 8, 2 / 3, scales=scales)
    assert pred.shape == (1, 30, 40) and pred.unique().tolist() == [1]
    # each scale as is (brighter rightwards), then mirrored
    model = _BySize({40: [6.0, 0.0], 20: [0.0, 0.5], 60: [0.0, 0.5]})
    pred, _ = segment(model, image, "original", 8, 2 / 3, scales=scales, flip=True)
    assert pred.unique().tolist() == [0]
    assert model.calls == [(h, w, mirrored) for h, w in ((30, 40), (15, 20), (45, 60))
                           for mirrored in (True, False)]  # fmt: skip


def test_a_flip_adds_the_mirrored_prediction_mirrored_back():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 5, padding=2)  # not mirror-symmetric
    image = torch.randn(1, 3, 12, 16)
    pred, _ = segment(model, image, "original", 8, 2 / 3, flip=True)
    both = model(image).softmax(1) + model(image.flip(-1)).softmax(1).flip(-1)
    assert torch.equal(pred, both.argmax(1))
    assert not torch.equal(pred, model(image).argmax(1))  # the mirrored pass changed some pixels
    per_pixel = nn.Conv2d(3, 3, 1)  # a per-pixel model: mirroring changes nothing
    for mode in ("original", "sliding_window"):
        plain, _ = segment(per_pixel, image, mode, 8, 2 / 3)
        flipped, _ = segment(per_pixel, image, mode, 8, 2 / 3, flip=True)
        assert torch.equal(plain, flipped), mode


def test_center_crop_crops_image_and_mask_alike():
    image = torch.arange(6 * 8).view(1, 1, 6, 8)
    mask = torch.arange(6 * 8).view(1, 6, 8)
    img, msk = center_crop(image, mask, 4)
    assert img.shape[-2:] == (4, 4) and torch.equal(img[0, 0], msk[0])
    assert img[0, 0, 0, 0] == 1 * 8 + 2  # top (6-4)//2 = 1, left (8-4)//2 = 2
    small, _ = center_crop(image, None, 10)  # smaller than the crop: kept whole
    assert small.shape[-2:] == (6, 8)


class _Oracle(nn.Module):
    """Predicts class = red channel > 0 (after normalisation), with BatchNorm to check modes."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        assert not self.training, "evaluation must run in eval mode"
        red = (x[:, :1] > 0).float()
        return torch.cat([1 - red, red], dim=1) * 10


class _Zeros(_Oracle):
    def forward(self, x):  # always class 0
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])


def test_evaluate_two_models_restores_modes():
    cfg = Config()
    cfg.model.num_classes = 2
    cfg.data.crop_size = 4
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    img[0, :, :2] = 255  # red on the left half -> class 1
    mask = torch.zeros(4, 4, dtype=torch.uint8)
    mask[:, :2] = 1
    mask[0, 0] = 255  # ignored
    perfect, wrong = _Oracle(), _Zeros()
    perfect.train()
    wrong.eval()
    out = evaluate(
        {"student": perfect, "teacher": wrong}, [(img, mask)] * 2, cfg, torch.device("cpu")
    )
    assert perfect.training and not wrong.training  # modes restored
    assert out["student"].miou == 1.0 and out["student"].images == 2
    assert out["student"].confusion.tolist() == [[16, 0], [0, 14]]
    # always 0: class 0 IoU = 16 / 30, class 1 IoU = 0
    assert out["teacher"].iou == pytest.approx([16 / 30, 0.0])
    for mode in ("center_crop", "sliding_window"):
        again = evaluate({"s": perfect}, [(img, mask)], cfg, torch.device("cpu"), mode=mode)
        assert again["s"].miou == 1.0


def test_per_image_matrices_add_up_to_the_evaluation():
    cfg = Config()
    cfg.model.num_classes, cfg.data.crop_size = 2, 4
    images = []
    for left in (1, 2, 3):  # class 1 on the red columns, more of them in each image
        img = torch.zeros(3, 4, 4, dtype=torch.uint8)
        img[0, :, :left] = 255
        images.append((img, (img[0] > 0).to(torch.uint8)))
    seen = []
    models = {"student": _Oracle(), "teacher": _Zeros()}
    out = evaluate(models, images, cfg, torch.device("cpu"), per_image=seen.append)
    assert len(seen) == 3 and all(set(image) == {"student", "teacher"} for image in seen)
    for name in models:
        assert torch.equal(sum(image[name] for image in seen), out[name].confusion)
    assert [image["teacher"][1, 0].item() for image in seen] == [4, 8, 12]  # class 1 as 0


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_on_cpu_only_where_the_cpu_has_bf16(monkeypatch, native):
    from dssn.config import set_values
    from dssn.train import evaluate as ev

    monkeypatch.setattr(ev, "cpu_has_bf16", lambda: native)
    cpu = torch.device("cpu")
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with ev.autocast_for(set_values(Config(), {"train.amp": "bf16"}), cpu):
        out = conv(x)
    assert ev.amp_enabled(set_values(Config(), {"train.amp": "bf16"}), cpu) is native
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    assert conv.weight.dtype == torch.float32  # autocast casts copies, never the weights
    with ev.autocast_for(Config(), cpu):  # train.amp: none
        assert conv(x).dtype == torch.float32
    assert not ev.amp_enabled(Config(), cpu)


def test_fp16_applies_on_cuda_only_and_the_cpu_says_so(monkeypatch):
    from dssn.config import set_values
    from dssn.train import evaluate as ev
    from dssn.train.setup import build_networks

    monkeypatch.setattr(ev, "cpu_has_bf16", lambda: True)  # fp16 is not bf16's CPU rule
    cfg = set_values(Config(), {"train.amp": "fp16"})
    cpu = torch.device("cpu")
    assert ev.amp_enabled(cfg, torch.device("cuda", 0)) and not ev.amp_enabled(cfg, cpu)
    assert ev.amp_fallback_note(cfg, cpu) == "train.amp=fp16 applies on CUDA only; float32 on cpu"
    assert ev.amp_fallback_note(cfg, torch.device("cuda", 0)) is None
    with ev.autocast_for(cfg, cpu):
        assert nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    monkeypatch.setattr(ev, "cpu_has_bf16", lambda: False)
    bf16 = set_values(Config(), {"train.amp": "bf16"})
    assert "no native bf16" in ev.amp_fallback_note(bf16, cpu)
    assert ev.amp_fallback_note(Config(), cpu) is None  # train.amp: none
    cfg.model.backbone, cfg.model.width = "tiny", 8
    assert not build_networks(cfg, cpu, world_size=1).scaler.is_enabled()
