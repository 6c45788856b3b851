"""Dilated ResNet backbones returning the (c1, c4) features DeepLabV3+ needs.

One class covers every backbone; they differ in block type, depth, width and stem:

- ``tiny``: BasicBlock, one block per stage, base width ``cfg.width`` (CPU tests and demos);
- ``resnet18`` / ``resnet34``: BasicBlock, torchvision channel counts and key names;
- ``resnet50`` / ``resnet101``: torchvision's Bottleneck, torchvision key names (so torchvision
  ImageNet state dicts load with ``strict=True``);
- ``resnet50_deep`` / ``resnet101_deep``: the DSSN/UniMatch reference deep stem (three 3x3
  convs 3->64->64->128 as ``conv1.0/1/3/4/6``), so the reference ``resnet101.pth`` loads as is.

Strides are replaced by dilation from layer4 (output stride 16) or from layer3 on (8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

STEM_STRIDE = 4  # conv1 (stride 2) + max-pool (stride 2): c1 is at 1/4 of the input
DEEP_STEM_WIDTH = 64  # reference deep stem: 3 -> 64 -> 64 -> 2 * 64


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same attribute names, so its weights load), with dilation.

    torchvision's own BasicBlock refuses ``dilation > 1``; ResNet-18/34 need it for OS 16.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


@dataclass(frozen=True)
class ResNetSpec:
    """The shape of one named backbone."""

    block: type[nn.Module]
    layers: tuple[int, int, int, int]
    deep_stem: bool = False
    torchvision_name: str | None = None  # for ImageNet weights via torchvision


SPECS: dict[str, ResNetSpec] = {
    "tiny": ResNetSpec(BasicBlock, (1, 1, 1, 1)),
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2), torchvision_name="resnet18"),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3), torchvision_name="resnet34"),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3), torchvision_name="resnet50"),
    "resnet101": ResNetSpec(Bottleneck, (3, 4, 23, 3), torchvision_name="resnet101"),
    "resnet50_deep": ResNetSpec(Bottleneck, (3, 4, 6, 3), deep_stem=True),
    "resnet101_deep": ResNetSpec(Bottleneck, (3, 4, 23, 3), deep_stem=True),
}

RESNET_WIDTH = 64  # base width of every full-size ResNet; only ``tiny`` uses cfg.width


def _deep_stem(out_channels: int) -> nn.Sequential:
    # indices 0..6 give the reference keys conv1.0 / conv1.1 / conv1.3 / conv1.4 / conv1.6;
    # the last conv's BN + ReLU are the separate ``bn1`` / ``relu`` (as in the reference)
    mid = DEEP_STEM_WIDTH
    return nn.Sequential(
        nn.Conv2d(3, mid, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
    )


class ResNetBackbone(nn.Module):
    """A ResNet without avgpool/fc whose forward returns ``(c1, c4)``.

    ``c1`` = layer1 output (B, C1, H/4, W/4); ``c4`` = layer4 output (B, C4, H/os, W/os).
    """

    def __init__(self, spec: ResNetSpec, width: int = RESNET_WIDTH, output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        # layer2..4 each halve the resolution unless dilated: OS 16 dilates layer4, OS 8 also 3
        dilate = (False, output_stride == 8, True)
        block = spec.block
        self.inplanes = 2 * DEEP_STEM_WIDTH if spec.deep_stem else width
        self.dilation = 1
        if spec.deep_stem:
            self.conv1 = _deep_stem(self.inplanes)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, spec.layers[0])
        self.layer2 = self._make_layer(block, 2 * width, spec.layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, 4 * width, spec.layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, 8 * width, spec.layers[3], 2, dilate[2])
        self.c1_channels = width * block.expansion
        self.c4_channels = 8 * width * block.expansion
        self.output_stride = output_stride
        for m in self.modules():  # the reference's (and torchvision's) initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1, dilate=False
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # first block keeps the previous dilation (as torchvision and the reference do)
        layers = [block(self.inplanes, planes, stride, downsample, dilation=previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, C0, H/4, W/4)
        c1 = self.layer1(x)  # (B, C1, H/4, W/4)
        c4 = self.layer4(self.layer3(self.layer2(c1)))  # (B, C4, H/os, W/os)
        return c1, c4


def build_backbone(name: str, width: int = RESNET_WIDTH, output_stride: int = 16):
    """A randomly initialised backbone by name (see ``SPECS``)."""
    if name not in SPECS:
        raise ValueError(f"unknown backbone '{name}'; expected one of {list(SPECS)}")
    if name != "tiny":
        width = RESNET_WIDTH
    if width <= 0:
        raise ValueError(f"model.width must be positive, got {width}")
    return ResNetBackbone(SPECS[name], width=width, output_stride=output_stride)
