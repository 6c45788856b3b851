"""DeepLabV3+ with the DSSN feature-perturbation branches (METHOD.md "Model", step 3).

Submodule names follow the DSSN/UniMatch reference (``backbone``, ``head`` = ASPP, ``reduce``,
``fuse``, ``classifier``) so a reference checkpoint maps onto this model by a prefix strip.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNetBackbone

# Head widths derive from the backbone so that tiny backbones keep tiny heads; for the
# 2048-channel ResNet-50/101 they give exactly the reference: ASPP 2048 // 8 = 256, c1 256 -> 48.
ASPP_REDUCTION = 8  # ASPP branch width = c4 channels // 8
LOW_LEVEL_RATIO = 48 / 256  # c1 reduction: 48 of the reference's 256 low-level channels
MIN_HEAD_CHANNELS = 16  # floor of the ASPP / fuse width for very narrow backbones
MIN_LOW_LEVEL_CHANNELS = 8  # floor of the reduced c1 width


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel // 2)
    return [
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 conv -> broadcast back to (h, w)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _upsample(self.gap(x), x.shape[-2:])  # (B, cout, 1, 1) -> (B, cout, h, w)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three 3x3 atrous, image pooling; 1x1 projection."""

    def __init__(self, cin: int, cout: int, rates: list[int]) -> None:
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"model.aspp_rates needs three atrous rates, got {rates}")
        self.b0 = nn.Sequential(*_conv_bn_relu(cin, cout))
        self.b1 = nn.Sequential(*_conv_bn_relu(cin, cout, 3, rates[0]))
        self.b2 = nn.Sequential(*_conv_bn_relu(cin, cout, 3, rates[1]))
        self.b3 = nn.Sequential(*_conv_bn_relu(cin, cout, 3, rates[2]))
        self.b4 = ASPPPooling(cin, cout)
        self.project = nn.Sequential(*_conv_bn_relu(5 * cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))  # (B, 5 * cout, h, w) -> (B, cout, h, w)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ whose forward optionally adds feature-perturbed decoder branches.

    ``model(x)`` -> logits (B, C, H, W) at the input size.
    ``model(x, fp=n, fp_start=k)`` -> ``(clean, [perturbed] * n)``: clean (B, C, H, W) and n
    tensors (B - k, C, H, W), each the decoder on features ``[k:]`` after an independent
    Dropout2d draw on c1 and on c4. All versions go through the decoder in one batch, so its
    BatchNorm sees them together, as in the reference.
    """

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        aspp_rates: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        c1, c4 = backbone.c1_channels, backbone.c4_channels
        head = max(c4 // ASPP_REDUCTION, MIN_HEAD_CHANNELS)
        low = max(round(c1 * LOW_LEVEL_RATIO), MIN_LOW_LEVEL_CHANNELS)
        self.backbone = backbone
        self.head = ASPP(c4, head, aspp_rates)
        self.reduce = nn.Sequential(*_conv_bn_relu(c1, low))
        self.fuse = nn.Sequential(
            *_conv_bn_relu(head + low, head, 3), *_conv_bn_relu(head, head, 3)
        )
        self.classifier = nn.Conv2d(head, num_classes, 1)
        # feature perturbation (registered, so eval() turns them off; no parameters)
        self.dropout_c1 = nn.Dropout2d(dropout)
        self.dropout_c4 = nn.Dropout2d(dropout)

    def decode(self, c1: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        """Decoder: (B, C1, h1, w1), (B, C4, h4, w4) -> logits (B, classes, h1, w1)."""
        c4 = _upsample(self.head(c4), c1.shape[-2:])  # (B, head, h1, w1)
        feature = torch.cat([self.reduce(c1), c4], dim=1)  # (B, low + head, h1, w1)
        return self.classifier(self.fuse(feature))

    def forward(
        self, x: torch.Tensor, fp: int = 0, fp_start: int = 0
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        size = x.shape[-2:]
        c1, c4 = self.backbone(x)
        if fp == 0:
            return _upsample(self.decode(c1, c4), size)
        batch = x.shape[0]
        if fp < 0 or not 0 <= fp_start <= batch:
            raise ValueError(f"need fp >= 0 and 0 <= fp_start <= {batch}; got {fp}, {fp_start}")
        # clean features of all B images, then fp perturbed copies of images [fp_start:]
        c1_all = torch.cat([c1] + [self.dropout_c1(c1[fp_start:]) for _ in range(fp)])
        c4_all = torch.cat([c4] + [self.dropout_c4(c4[fp_start:]) for _ in range(fp)])
        logits = _upsample(self.decode(c1_all, c4_all), size)  # (B + fp * (B - k), C, H, W)
        clean, *perturbed = logits.split([batch] + [batch - fp_start] * fp)
        return clean, perturbed

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained at the base lr (the pretrained backbone)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter (ASPP, reduce, fuse, classifier): trained at lr * lr_multi."""
        return (p for name, p in self.named_parameters() if not name.startswith("backbone."))
