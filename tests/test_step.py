"""The training step on the tiny backbone (CPU, 32 px, batch 2): runs, learns, and the
shortcut switches agree with the reference structure where the math says they must."""

from __future__ import annotations

import copy

import pytest
import torch

from dssn.config import Config, set_values
from dssn.method import EMATeacher, StepOutputs, cutmix, loss_block, skips_strong, step
from dssn.method.step import CLASS_METRICS
from dssn.model import build_model

SIZE, BATCH, CLASSES = 32, 2, 3
METRICS = {
    "loss_x",
    "loss_s1",
    "loss_s2",
    "loss_fa",
    "loss_fb",
    "loss_img",
    "loss_feat",
    "mask_ratio",
    *CLASS_METRICS,
}


def tiny_cfg(**values) -> Config:
    base = {"backbone": "tiny", "width": 8, "num_classes": CLASSES}
    return set_values(Config(), {**base, **values})


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch with the keys of docs/CONTRACTS.md (padding and boxes included)."""
    gen = torch.Generator().manual_seed(seed)

    def image() -> torch.Tensor:
        return torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)

    # labeled images show their mask (blocks of 8 px, one colour channel per class) plus
    # noise, so that a few steps can learn them
    blocks = torch.randint(0, CLASSES, (BATCH, 1, SIZE // 8, SIZE // 8), generator=gen)
    mask = torch.nn.functional.interpolate(blocks.float(), size=(SIZE, SIZE)).long()[:, 0]
    image_x = torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2) * 2.0 + image()
    mask[:, -4:] = 255  # labeled padding
    ignore = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.long)
    ignore[:, :, -5:] = 255  # unlabeled padding
    ignore_mix = torch.zeros_like(ignore)
    ignore_mix[:, :3] = 255
    box1 = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.long)
    box1[0, 4:20, 8:24] = 1  # image 1 has no box (p = 0.5 each)
    box2 = torch.zeros_like(box1)
    box2[:, 10:30, 0:12] = 1
    return {
        "image_x": image_x,
        "mask_x": mask,
        "image_u_w": image(),
        "image_u_s1": image(),
        "image_u_s2": image(),
        "ignore_u": ignore,
        "box_u1": box1,
        "box_u2": box2,
        "image_mix_w": image(),
        "image_mix_s1": image(),
        "image_mix_s2": image(),
        "ignore_mix": ignore_mix,
    }


def networks(cfg: Config):
    torch.manual_seed(0)
    student = build_model(cfg.model)
    return student, EMATeacher(student, cfg.dssn.ema).teacher


def test_step_runs_forward_and_backward_with_tensor_metrics():
    cfg = tiny_cfg()
    student, teacher = networks(cfg)
    loss, metrics = step(student, teacher, make_batch(), cfg, iteration=3, epoch=1)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(metrics) == METRICS
    for name, value in metrics.items():
        shape = (CLASSES,) if name in CLASS_METRICS else ()
        assert isinstance(value, torch.Tensor) and value.shape == shape, name
        assert not value.requires_grad, name
    loss.backward()
    assert all(p.grad is not None for p in student.backbone_parameters())
    assert all(p.grad is not None for p in student.head_parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_step_makes_no_host_sync(monkeypatch):
    cfg = tiny_cfg(consistency="infonce", labeled_loss="ohem", ohem_min_kept=50)
    student, teacher = networks(cfg)
    batch = make_batch()

    def refuse(*_args, **_kwargs):
        raise AssertionError("host sync inside the step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss, _ = step(student, teacher, batch, cfg, iteration=5, epoch=0)
    monkeypatch.undo()
    assert torch.isfinite(loss)


def test_supervised_method_uses_only_the_labeled_loss():
    cfg = tiny_cfg(method="supervised")
    student, teacher = networks(cfg)
    batch = {k: v for k, v in make_batch().items() if k in ("image_x", "mask_x")}
    loss, metrics = step(student, teacher, batch, cfg)
    assert set(metrics) == {"loss_x"}
    assert torch.equal(loss.detach(), metrics["loss_x"])


def test_missing_batch_key_is_an_error_naming_it():
    cfg = tiny_cfg()
    student, teacher = networks(cfg)
    batch = make_batch()
    del batch["box_u2"]
    with pytest.raises(KeyError, match="box_u2"):
        step(student, teacher, batch, cfg)


def test_cutmix_pastes_inside_the_box_without_mutating():
    target, source = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    box = torch.zeros(2, 4, 4, dtype=torch.long)
    box[0, 1:3, 1:3] = 1
    mixed = cutmix(target, source, box)
    assert mixed[0, :, 1:3, 1:3].eq(1).all() and mixed.sum() == 3 * 4  # every channel, 1 image
    assert target.sum() == 0
    ignore = cutmix(torch.zeros(2, 4, 4), torch.full((2, 4, 4), 255.0), box)
    assert ignore.eq(255).sum() == 4


def random_outputs(seed: int = 0) -> StepOutputs:
    gen = torch.Generator().manual_seed(seed)

    def logits() -> torch.Tensor:
        return torch.randn(BATCH, CLASSES, 8, 8, generator=gen) * 3

    batch = make_batch(seed)
    crop = slice(0, 8)
    return StepOutputs(
        labeled=logits(),
        labels=batch["mask_x"][:, crop, crop],
        weak=logits(),
        perturbed=(logits(), logits()),
        strong=(logits(), logits()),
        teacher=logits(),
        teacher_mix=logits(),
        boxes=(batch["box_u1"][:, crop, crop], batch["box_u2"][:, crop, crop]),
        ignore=torch.randint(0, 2, (BATCH, 8, 8), generator=gen) * 255,
        ignore_mix=torch.zeros(BATCH, 8, 8, dtype=torch.long),
    )


def test_per_class_counts_are_the_pseudo_labels_and_the_kept_ones_outside_padding():
    out = random_outputs(3)
    _, metrics, maps = loss_block(out, tiny_cfg(), skip_strong=False)
    pseudo = torch.zeros(CLASSES)
    kept = torch.zeros(CLASSES)
    for view in ("s1", "s2"):
        labels = maps[f"pseudo_label_{view}"]
        pseudo += torch.bincount(labels[maps[f"ignore_{view}"] != 255], minlength=CLASSES)
        kept += torch.bincount(labels[maps[f"selected_{view}"]], minlength=CLASSES)
    assert torch.equal(metrics["pseudo_pixels"], pseudo)
    assert torch.equal(metrics["selected_pixels"], kept)
    assert 0 < kept.sum() < pseudo.sum() < 2 * BATCH * 8 * 8  # some kept; padding left out


def test_loss_layout_voc_first_iteration_and_cityscapes():
    out = random_outputs()
    cfg = tiny_cfg(selection="threshold", threshold=0.5)
    loss, m, _ = loss_block(out, cfg, skip_strong=False)
    first, _, _ = loss_block(out, cfg, skip_strong=True)
    w = cfg.dssn
    unsup = w.w_fp * (m["loss_fa"] + m["loss_fb"])
    consistency = w.w_consistency * (m["loss_img"] + m["loss_feat"])
    strong = w.w_strong * (m["loss_s1"] + m["loss_s2"])
    torch.testing.assert_close(loss, 0.5 * (m["loss_x"] + strong + unsup + consistency))
    torch.testing.assert_close(first, 0.5 * (m["loss_x"] + unsup + consistency))
    assert m["loss_s1"] > 0 and m["loss_s2"] > 0

    city = tiny_cfg(
        consistency_outside_half=True, w_consistency=0.005, labeled_loss="ohem", selection="none"
    )
    loss, m, maps = loss_block(out, city, skip_strong=False)
    expected = 0.5 * (
        m["loss_x"] + 0.25 * (m["loss_s1"] + m["loss_s2"] + m["loss_fa"] + m["loss_fb"])
    ) + 0.005 * (m["loss_img"] + m["loss_feat"])
    torch.testing.assert_close(loss, expected)
    # selection none: every non-padding pixel trains
    assert torch.equal(maps["selected_w"], out.ignore != 255)


def test_strong_terms_are_skipped_on_the_first_iteration_and_during_warmup():
    voc = tiny_cfg()
    assert skips_strong(voc, iteration=0, epoch=0)
    assert not skips_strong(voc, iteration=1, epoch=0)
    assert not skips_strong(voc, iteration=0, epoch=1)  # an in-epoch counter never re-skips
    city = tiny_cfg(strong_warmup_epochs=5)
    assert skips_strong(city, iteration=700, epoch=4)
    assert not skips_strong(city, iteration=701, epoch=5)


def test_consistency_choice_changes_the_consistency_terms():
    out = random_outputs(1)
    _, mse, _ = loss_block(out, tiny_cfg(consistency="mse"), skip_strong=False)
    torch.manual_seed(0)
    _, nce, _ = loss_block(out, tiny_cfg(consistency="infonce"), skip_strong=False)
    torch.manual_seed(0)
    _, hot, _ = loss_block(out, tiny_cfg(consistency="infonce", temperature=1.0), skip_strong=False)
    assert not torch.isclose(mse["loss_img"], nce["loss_img"])
    assert not torch.isclose(nce["loss_img"], hot["loss_img"])
    assert torch.equal(mse["loss_x"], nce["loss_x"])  # the other terms are untouched


def test_loss_block_computes_in_float32_under_bf16():
    def bf16(value):
        if isinstance(value, tuple):
            return tuple(bf16(v) for v in value)
        return value.bfloat16() if value.is_floating_point() else value

    out = random_outputs(2)
    half = StepOutputs(**{name: bf16(value) for name, value in vars(out).items()})
    assert half.teacher.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics, _ = loss_block(half, tiny_cfg(consistency="infonce"), skip_strong=False)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in metrics.values())


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("switch", ["fp_unlabeled_only", "teacher_single_pass"])
def test_shortcuts_equal_the_reference_structure_when_batchnorm_stats_are_fixed(switch):
    # With BatchNorm on running statistics (eval mode; dropout off too) no output depends on
    # which other images share a batch, so a shortcut changes only the work done: the loss and
    # the gradients must equal the reference structure's. In train mode they legitimately
    # differ (BatchNorm statistics over other batches), which is the shortcuts' whole trade.
    results = []
    for on in (False, True):
        cfg = tiny_cfg(**{switch: on})
        student, teacher = networks(cfg)
        student.eval()
        teacher.eval()
        loss, metrics = step(student, teacher, make_batch(), cfg, iteration=1)
        loss.backward()
        results.append((loss.detach(), metrics, grads(student)))
    (loss_ref, m_ref, g_ref), (loss_cut, m_cut, g_cut) = results
    torch.testing.assert_close(loss_cut, loss_ref, rtol=1e-6, atol=1e-7)
    for name in m_ref:
        torch.testing.assert_close(m_cut[name], m_ref[name], rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(g_cut, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_teacher_single_pass_changes_batchnorm_statistics_in_train_mode():
    # the counterpart of the test above: with training-mode BN the two structures differ
    losses = []
    for on in (False, True):
        cfg = tiny_cfg(teacher_single_pass=on, selection="none")
        student, teacher = networks(cfg)
        out_teacher = copy.deepcopy(teacher)
        torch.manual_seed(1)
        losses.append(step(student, out_teacher, make_batch(), cfg, iteration=1)[1]["loss_s1"])
    assert not torch.isclose(losses[0], losses[1])


def test_a_few_dozen_steps_drive_the_labeled_loss_down():
    cfg = tiny_cfg()
    student, _ = networks(cfg)
    ema = EMATeacher(student, momentum=cfg.dssn.ema)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    batch = make_batch(7)
    history = []
    for it in range(30):
        loss, metrics = step(student, ema.teacher, batch, cfg, iteration=it)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(student)
        history.append(metrics["loss_x"].item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.3 * history[0], history
