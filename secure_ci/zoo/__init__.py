"""A small model zoo written in the project (no torchvision), for tests, benchmarks and demos.

ResNet-18-style (skip connections), MobileNetV2-style (inverted residuals), a ViT-like
transformer encoder (attention, layer norm, residuals) and the digits CNN, each traceable by
torch.fx and small by default so every cut can be checked quickly.
"""

from __future__ import annotations

from secure_ci.zoo._mobilenet import mobilenet_v2
from secure_ci.zoo._registry import ZooEntry, get, names
from secure_ci.zoo._resnet import resnet18
from secure_ci.zoo._transformer import transformer_encoder

__all__ = ["ZooEntry", "get", "mobilenet_v2", "names", "resnet18", "transformer_encoder"]
