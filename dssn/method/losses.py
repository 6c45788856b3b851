"""The loss terms of one DSSN step (METHOD.md step 7), each written once.

- :func:`labeled_ce` and :func:`ohem_ce`: the supervised loss on labeled images;
- :func:`pseudo_label_ce`: the masked cross-entropy of all four unlabeled terms
  (``Ls1``, ``Ls2``, ``Lfa``, ``Lfb``);
- :func:`normalized_mse` and :func:`pixel_infonce`: the Siamese consistency between the two
  branches of a pair (image level: the strong views; feature level: the perturbed decoders).

All take logits (B, C, H, W) and return a 0-dim tensor. None synchronises with the host (no
``.item()``, no Python branch on a tensor value), so a step can run ahead on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dssn.config import IGNORE_INDEX


def labeled_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (B, C, H, W) vs (B, H, W), mean over pixels whose label is not 255.

    ``nn.CrossEntropyLoss(ignore_index=255)`` of the reference, except that a batch with no
    labeled pixel gives 0 instead of NaN.
    """
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def ohem_ce(
    logits: torch.Tensor, labels: torch.Tensor, thresh: float, min_kept: int
) -> torch.Tensor:
    """Online hard example mining CE, as the reference's ``ProbOhemCrossEntropy2d``.

    Keep the labeled pixels whose probability of their true class is at most
    ``max(thresh, p_k)``, with ``p_k`` the ``min_kept``-th smallest such probability; when
    fewer than ``min_kept`` pixels are labeled (or ``min_kept`` is 0) every labeled pixel is
    kept. Mean CE over the kept pixels. Written without host syncs: the reference's
    Python branches on tensor values become ``torch.where``.
    """
    valid = labels != IGNORE_INDEX  # (B, H, W)
    if min_kept <= 0:  # the reference only mines when min_kept > 0
        return labeled_ce(logits, labels)
    with torch.no_grad():
        prob = logits.detach().float().softmax(dim=1)  # (B, C, H, W)
        safe = torch.where(valid, labels, 0)  # any in-range class for ignored pixels
        true_prob = prob.gather(1, safe.unsqueeze(1)).squeeze(1)  # (B, H, W)
        true_prob = true_prob.masked_fill(~valid, 1.0).flatten()  # ignored never count as hard
        k = min(true_prob.numel(), min_kept)
        kth = true_prob.kthvalue(k).values  # 0-dim: the k-th smallest true-class probability
        threshold = torch.clamp_min(kth, thresh)
        hard = true_prob.view_as(valid) <= threshold
        mine = valid.sum() >= min_kept  # 0-dim bool: enough labeled pixels to mine
        kept = valid & (hard | ~mine)
    return labeled_ce(logits, torch.where(kept, labels, IGNORE_INDEX))


def pseudo_label_ce(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    selected: torch.Tensor,
    ignore: torch.Tensor,
) -> torch.Tensor:
    """``Σ CE(logits, pseudo_labels) · [selected ∧ ignore != 255] / Σ [ignore != 255]``.

    logits (B, C, H, W); pseudo_labels (B, H, W) long; selected (B, H, W) bool;
    ignore (B, H, W) with 255 on padding. The denominator counts every non-padding pixel, not
    only the selected ones (the reference): fewer selected pixels means a smaller loss.
    """
    valid = ignore != IGNORE_INDEX
    ce = F.cross_entropy(logits, pseudo_labels, reduction="none")  # (B, H, W)
    return (ce * (selected & valid)).sum() / valid.sum().clamp_min(1)


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per pixel, ``(p - mean_c p) / std_c p`` with the unbiased std over classes.

    The std is taken from the centred logits (two passes) rather than ``Tensor.std``: the same
    value, and on CPU several times faster (``std`` over the channel dimension was 10% of a
    DSSN step on the digits)."""
    centred = logits - logits.mean(dim=1, keepdim=True)
    var = centred.square().sum(dim=1, keepdim=True) / (logits.shape[1] - 1)
    return centred / var.sqrt()


def normalized_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE between standardized logits of two branches (B, C, H, W); gradient into both."""
    return F.mse_loss(standardize_logits(a), standardize_logits(b))


def _sample_pixels(batch: int, pixels: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` distinct pixel indices per image, (B, count); all pixels when count >= N."""
    if count >= pixels:
        return torch.arange(pixels, device=device).expand(batch, pixels)
    return torch.rand(batch, pixels, device=device).topk(count, dim=1).indices


def pixel_infonce(
    a: torch.Tensor, b: torch.Tensor, temperature: float, pixels_per_image: int
) -> torch.Tensor:
    """Symmetric pixel-wise InfoNCE between two branches a, b (B, C, H, W).

    ``pixels_per_image`` pixel positions are drawn per image (the same positions in both
    branches). Each pixel's embedding is its logit vector, centred over classes and
    L2-normalised, so the similarity is the Pearson correlation of the two logit vectors (the
    quantity the reference MSE of standardized logits pulls to 1). For a pixel of ``a`` the
    positive is the same pixel of ``b``; the negatives are the other sampled pixels of ``b``
    (every image of the batch). The loss averages the a->b and b->a directions.
    """
    batch, classes, height, width = a.shape
    index = _sample_pixels(batch, height * width, pixels_per_image, a.device)  # (B, n)
    gather = index.unsqueeze(1).expand(batch, classes, index.shape[1])  # (B, C, n)

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).gather(2, gather).transpose(1, 2).reshape(-1, classes)  # (B * n, C)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)

    za, zb = embed(a), embed(b)
    similarity = za @ zb.T / temperature  # (M, M), M = B * n; diagonal = positives
    target = torch.arange(similarity.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target))
