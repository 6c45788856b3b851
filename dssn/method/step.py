"""One DSSN training step: ``step(student, teacher, batch, cfg) -> (loss, metrics)``.

Two halves, so that the math can be checked on fixed tensors:

- :func:`forward_networks`: the network passes of METHOD.md steps 1-4 (teacher on the weak
  views, CutMix of the strong views, student with feature perturbation, student on the strong
  views), returning a :class:`StepOutputs`;
- :func:`loss_block`: everything after the network outputs (steps 5-7): mixed pseudo-labels,
  selection, the loss terms and the total. A pure function of tensors and the config.

No optimizer, no logging, no host synchronisation: metrics are detached 0-dim tensors, except
the per-class counts ``pseudo_pixels`` and ``selected_pixels`` (C,) (:data:`CLASS_METRICS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dssn.config import IGNORE_INDEX, Config

from .losses import labeled_ce, normalized_mse, ohem_ce, pixel_infonce, pseudo_label_ce
from .selection import select

LOSS_SCALE = 0.5  # the reference halves the summed loss: L = 1/2 (Lx + ...)
# (C,) metrics: the teacher's pseudo-labels of the two mixed strong views per class (not
# padding), and how many of them the selection kept: what the class-aware rule does per class
CLASS_METRICS = ("pseudo_pixels", "selected_pixels")
FEATURE_BRANCHES = 2  # the feature-level Siamese pair: two independent dropout draws

LABELED_KEYS = ("image_x", "mask_x")
UNLABELED_KEYS = (
    "image_u_w",
    "image_u_s1",
    "image_u_s2",
    "ignore_u",
    "box_u1",
    "box_u2",
    "image_mix_w",
    "image_mix_s1",
    "image_mix_s2",
    "ignore_mix",
)


@dataclass
class StepOutputs:
    """The network outputs one loss block needs (logits (B, C, H, W); masks (B, H, W))."""

    labeled: torch.Tensor  # student on the labeled images (B_x)
    labels: torch.Tensor  # their masks, 255 = ignore
    weak: torch.Tensor  # student, clean decoder, on the weak unlabeled views (B_u)
    perturbed: tuple[torch.Tensor, torch.Tensor]  # the two feature-perturbed branches (B_u)
    strong: tuple[torch.Tensor, torch.Tensor]  # student on the two CutMixed strong views
    teacher: torch.Tensor  # teacher on the weak views u_w
    teacher_mix: torch.Tensor  # teacher on the CutMix partner's weak views u'_w
    boxes: tuple[torch.Tensor, torch.Tensor]  # CutMix boxes of the two strong views (1 inside)
    ignore: torch.Tensor  # 255 where u is padding, else 0
    ignore_mix: torch.Tensor  # the same for u'


def cutmix(target: torch.Tensor, source: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``target`` with ``source`` pasted where ``box == 1``; box (B, H, W), tensors (B, ..., H, W)
    (all channels of an image or of logits take the box). Returns a new tensor."""
    inside = box == 1
    if target.dim() == 4:
        inside = inside.unsqueeze(1)  # (B, 1, H, W): every channel
    return torch.where(inside, source, target)


def _check_keys(batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"step: the batch has no {missing} (it has {sorted(batch)})")


def forward_networks(
    student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], cfg: Config
) -> StepOutputs:
    """The network passes of one step (METHOD.md steps 1-4), honouring the shortcut switches
    ``dssn.teacher_single_pass`` and ``dssn.fp_unlabeled_only``."""
    _check_keys(batch, LABELED_KEYS + UNLABELED_KEYS)
    image_x, weak_u, weak_mix = batch["image_x"], batch["image_u_w"], batch["image_mix_w"]
    num_x, num_u = image_x.shape[0], weak_u.shape[0]

    # 1. teacher pseudo-labels (no gradient; train mode, as the reference)
    with torch.no_grad():
        if cfg.dssn.teacher_single_pass:  # shortcut: BN statistics over both batches at once
            teacher_u, teacher_mix = teacher(torch.cat([weak_u, weak_mix])).split(
                [num_u, weak_mix.shape[0]]
            )
        else:  # reference: two passes, the partner batch first
            teacher_mix = teacher(weak_mix)
            teacher_u = teacher(weak_u)

    # 2. CutMix the strong views with the partner's strong views
    box1, box2 = batch["box_u1"], batch["box_u2"]
    strong1 = cutmix(batch["image_u_s1"], batch["image_mix_s1"], box1)
    strong2 = cutmix(batch["image_u_s2"], batch["image_mix_s2"], box2)

    # 3. student on labeled + weak with two feature-perturbed decoder branches
    fp_start = num_x if cfg.dssn.fp_unlabeled_only else 0
    clean, perturbed = student(torch.cat([image_x, weak_u]), fp=FEATURE_BRANCHES, fp_start=fp_start)
    if fp_start == 0:  # reference: branches were decoded for the labeled images too; drop them
        perturbed = [p[num_x:] for p in perturbed]
    labeled, weak = clean.split([num_x, num_u])

    # 4. student on both strong views in one pass
    strong_a, strong_b = student(torch.cat([strong1, strong2])).chunk(2)

    return StepOutputs(
        labeled=labeled,
        labels=batch["mask_x"],
        weak=weak,
        perturbed=(perturbed[0], perturbed[1]),
        strong=(strong_a, strong_b),
        teacher=teacher_u,
        teacher_mix=teacher_mix,
        boxes=(box1, box2),
        ignore=batch["ignore_u"],
        ignore_mix=batch["ignore_mix"],
    )


def _labeled_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: Config) -> torch.Tensor:
    if cfg.dssn.labeled_loss == "ohem":
        return ohem_ce(logits, labels, cfg.dssn.ohem_thresh, cfg.dssn.ohem_min_kept)
    return labeled_ce(logits, labels)


def _consistency(a: torch.Tensor, b: torch.Tensor, cfg: Config) -> torch.Tensor:
    if cfg.dssn.consistency == "infonce":
        return pixel_infonce(a, b, cfg.dssn.temperature, cfg.dssn.infonce_pixels)
    return normalized_mse(a, b)


def loss_block(
    out: StepOutputs, cfg: Config, skip_strong: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Pseudo-labels, selection, loss terms and total from the network outputs.

    ``skip_strong`` leaves ``Ls1``/``Ls2`` out of the total (first iteration; Cityscapes
    warm-up); they are still computed and reported. Runs in float32 even under autocast.
    Returns ``(loss, metrics, maps)``: metrics are detached 0-dim tensors; maps holds the mixed
    pseudo-labels / ignore masks and the selected-pixel masks (B, H, W) for inspection.
    """
    dssn = cfg.dssn
    with torch.autocast(out.labeled.device.type, enabled=False):
        labeled = out.labeled.float()
        weak = out.weak.detach().float()
        perturbed_a, perturbed_b = (p.float() for p in out.perturbed)
        strong_a, strong_b = (s.float() for s in out.strong)
        teacher, teacher_mix = out.teacher.detach().float(), out.teacher_mix.detach().float()

        # 5. pseudo-labels: teacher logits (all channels) and ignore masks mixed like the images
        mixed = [cutmix(teacher, teacher_mix, box) for box in out.boxes]
        pseudo = [logits.argmax(dim=1) for logits in mixed]
        ignore = [cutmix(out.ignore, out.ignore_mix, box) for box in out.boxes]
        weak_labels = weak.argmax(dim=1)
        # 6. selection
        selected = [select(logits, dssn) for logits in mixed]
        selected_weak = select(weak, dssn)

        # 7. losses
        loss_x = _labeled_loss(labeled, out.labels, cfg)
        loss_s1 = pseudo_label_ce(strong_a, pseudo[0], selected[0], ignore[0])
        loss_s2 = pseudo_label_ce(strong_b, pseudo[1], selected[1], ignore[1])
        loss_fa = pseudo_label_ce(perturbed_a, weak_labels, selected_weak, out.ignore)
        loss_fb = pseudo_label_ce(perturbed_b, weak_labels, selected_weak, out.ignore)
        loss_img = _consistency(strong_a, strong_b, cfg)
        loss_feat = _consistency(perturbed_a, perturbed_b, cfg)

        # the reference's order of summation (float32 totals agree to the last bits)
        terms = [loss_x]
        if not skip_strong:
            terms += [loss_s1 * dssn.w_strong, loss_s2 * dssn.w_strong]
        terms += [loss_fa * dssn.w_fp, loss_fb * dssn.w_fp]
        consistency = (loss_img + loss_feat) * dssn.w_consistency
        if dssn.consistency_outside_half:  # Cityscapes: 1/2 (...) + w_c (Limg + Lfeat)
            loss = LOSS_SCALE * sum(terms[1:], terms[0]) + consistency
        else:
            loss = LOSS_SCALE * sum(terms[1:] + [consistency], terms[0])

        valid = out.ignore != IGNORE_INDEX
        mask_ratio = (selected_weak & valid).sum() / valid.sum().clamp_min(1)
        classes = teacher.shape[1]
        unpadded = [mask != IGNORE_INDEX for mask in ignore]
        pseudo_pixels = sum(
            class_counts(p, v, classes) for p, v in zip(pseudo, unpadded, strict=True)
        )
        selected_pixels = sum(
            class_counts(p, s & v, classes)
            for p, s, v in zip(pseudo, selected, unpadded, strict=True)
        )

    metrics = {
        "loss_x": loss_x,
        "loss_s1": loss_s1,
        "loss_s2": loss_s2,
        "loss_fa": loss_fa,
        "loss_fb": loss_fb,
        "loss_img": loss_img,
        "loss_feat": loss_feat,
        "mask_ratio": mask_ratio,
        "pseudo_pixels": pseudo_pixels,
        "selected_pixels": selected_pixels,
    }
    maps = {
        "pseudo_label_s1": pseudo[0],
        "pseudo_label_s2": pseudo[1],
        "ignore_s1": ignore[0],
        "ignore_s2": ignore[1],
        # the pixels each unlabeled term trains on: selected and not padding
        "selected_s1": selected[0] & (ignore[0] != IGNORE_INDEX),
        "selected_s2": selected[1] & (ignore[1] != IGNORE_INDEX),
        "selected_w": selected_weak & valid,
    }
    return loss, {k: v.detach() for k, v in metrics.items()}, maps


def class_counts(labels: torch.Tensor, where: torch.Tensor, classes: int) -> torch.Tensor:
    """(C,) float: how many pixels of each class ``labels`` (B, H, W) holds where ``where``
    is true. A scatter-add, so no host sync (``bincount`` on CUDA syncs for its size)."""
    counts = torch.zeros(classes, device=labels.device)
    return counts.scatter_add_(0, labels.flatten(), where.flatten().float())


def skips_strong(cfg: Config, iteration: int, epoch: int) -> bool:
    """Whether Ls1/Ls2 stay out of the total: the very first iteration (the teacher is still
    untrained) and the first ``dssn.strong_warmup_epochs`` epochs."""
    return (iteration == 0 and epoch == 0) or epoch < cfg.dssn.strong_warmup_epochs


def step(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: Config,
    iteration: int = 0,
    epoch: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss and metrics (see docs/CONTRACTS.md for the batch keys).

    ``iteration`` is the global iteration (0 = the very first step of the run). With
    ``cfg.method == "supervised"`` (the baseline) and during the ``dssn.burn_in_epochs`` only the
    labeled loss is computed, from the labeled keys alone.
    """
    if cfg.labeled_only(epoch):
        _check_keys(batch, LABELED_KEYS)
        logits = student(batch["image_x"])
        with torch.autocast(logits.device.type, enabled=False):
            loss_x = _labeled_loss(logits.float(), batch["mask_x"], cfg)
        return loss_x, {"loss_x": loss_x.detach()}
    out = forward_networks(student, teacher, batch, cfg)
    loss, metrics, _ = loss_block(out, cfg, skips_strong(cfg, iteration, epoch))
    return loss, metrics
