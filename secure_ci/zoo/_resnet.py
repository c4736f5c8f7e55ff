"""A ResNet-18-style network (BasicBlocks with identity / 1x1 projection shortcuts)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RESNET18_INPUT_SHAPE", "resnet18"]

RESNET18_INPUT_SHAPE = (1, 3, 32, 32)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut; the add makes cuts here carry two tensors."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, four stages of two BasicBlocks, global pooling."""

    def __init__(self, num_classes: int, width: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        channels = width
        for k, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**k
            stages.append(
                nn.Sequential(
                    BasicBlock(channels, out_channels, stride),
                    BasicBlock(out_channels, out_channels, 1),
                )
            )
            channels = out_channels
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return logits


def resnet18(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Module:
    """ResNet-18-style model; ``width`` 64 is the classic size, 16 keeps tests fast."""
    return ResNet18(num_classes, width, in_channels)
