"""DeepLabV3+ and its ResNet backbones (pure PyTorch; no Ray, no data code)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .deeplab import DeepLabV3Plus
from .resnet import SPECS, ResNetBackbone, build_backbone
from .weights import WeightsError, load_backbone_file, load_pretrained, load_reference_checkpoint

if TYPE_CHECKING:
    from dssn.config import ModelConfig

__all__ = [
    "SPECS",
    "DeepLabV3Plus",
    "ResNetBackbone",
    "WeightsError",
    "build_backbone",
    "build_model",
    "load_backbone_file",
    "load_pretrained",
    "load_reference_checkpoint",
]


def build_model(cfg: ModelConfig) -> DeepLabV3Plus:
    """DeepLabV3+ from ``cfg.model``: backbone, output stride, classes, ASPP rates, dropout,
    and pretrained backbone weights (None | local path | "imagenet")."""
    backbone = build_backbone(cfg.backbone, width=cfg.width, output_stride=cfg.output_stride)
    load_pretrained(backbone, cfg.backbone, cfg.pretrained)
    return DeepLabV3Plus(backbone, cfg.num_classes, list(cfg.aspp_rates), cfg.dropout)
