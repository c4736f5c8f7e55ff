"""A small CNN for scikit-learn's bundled ``load_digits`` (8x8, upscaled to 32x32).

The reference model for accuracy figures: it trains in seconds on two cores (see
:mod:`secure_ci.zoo._train`). Its stages are shaped so that every cut whose float32 boundary
is at least 4 KiB keeps >= 256 values per channel, which keeps the per-channel quantization
parameters of the int8/int4 codecs under 2 % of the payload.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DIGITS_CLASSES", "DIGITS_INPUT_SHAPE", "DigitsCNN", "digits_cnn"]

DIGITS_INPUT_SHAPE = (1, 1, 32, 32)
DIGITS_CLASSES = 10


class DigitsCNN(nn.Module):
    """conv(8)@32 -> maxpool -> conv(16)@16 -> conv(16)@16 -> avgpool(4) -> linear."""

    def __init__(self, num_classes: int = DIGITS_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(4)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.relu3(self.conv3(self.relu2(self.conv2(x))))
        logits: torch.Tensor = self.fc(torch.flatten(self.pool2(x), 1))
        return logits


def digits_cnn() -> nn.Module:
    """The (untrained) digits CNN; :func:`secure_ci.zoo._train.load_trained_digits` trains it."""
    return DigitsCNN()
