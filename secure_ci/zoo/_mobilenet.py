"""A MobileNetV2-style network: inverted residual blocks with linear bottlenecks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MOBILENET_V2_INPUT_SHAPE", "mobilenet_v2"]

MOBILENET_V2_INPUT_SHAPE = (1, 3, 32, 32)

# (expansion t, output channels c, repeats n, first stride s), as in the paper (CIFAR strides)
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))


def _channels(value: float) -> int:
    return max(8, int(value + 4) // 8 * 8)


def _conv_bn(inp: int, out: int, kernel: int, stride: int, groups: int, act: bool) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); residual when shapes agree."""

    def __init__(self, inp: int, out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inp * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(inp, hidden, 1, 1, 1, act=True))
        layers.append(_conv_bn(hidden, hidden, 3, stride, hidden, act=True))
        layers.append(_conv_bn(hidden, out, 1, 1, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier and a shortened stage list for small inputs."""

    def __init__(self, num_classes: int, width_mult: float, in_channels: int) -> None:
        super().__init__()
        channels = _channels(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn(in_channels, channels, 3, 1, 1, act=True)]
        for t, c, n, s in _SETTINGS:
            out = _channels(c * width_mult)
            for k in range(n):
                layers.append(InvertedResidual(channels, out, s if k == 0 else 1, t))
                channels = out
        last = _channels(320 * width_mult)
        layers.append(_conv_bn(channels, last, 1, 1, 1, act=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(torch.flatten(self.pool(self.features(x)), 1))
        return logits


def mobilenet_v2(num_classes: int = 10, width_mult: float = 0.5, in_channels: int = 3) -> nn.Module:
    """MobileNetV2-style model; ``width_mult`` 1.0 is the paper's size."""
    return MobileNetV2(num_classes, width_mult, in_channels)
