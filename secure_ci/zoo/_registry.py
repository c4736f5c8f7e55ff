"""The model zoo registry: name -> how to build the model and its default input shape."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from secure_ci.exceptions import ConfigError
from secure_ci.zoo._mobilenet import MOBILENET_V2_INPUT_SHAPE, mobilenet_v2
from secure_ci.zoo._resnet import RESNET18_INPUT_SHAPE, resnet18
from secure_ci.zoo._transformer import TRANSFORMER_INPUT_SHAPE, transformer_encoder

__all__ = ["ZooEntry", "get", "names"]


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: ``build()`` returns a fresh (untrained unless stated) module."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


def _digits() -> ZooEntry:
    # Written separately (with its training code); imported only when asked for.
    module = importlib.import_module("secure_ci.zoo._digits")
    return ZooEntry("digits_cnn", module.digits_cnn, tuple(module.DIGITS_INPUT_SHAPE))


_ENTRIES: dict[str, Callable[[], ZooEntry]] = {
    "digits_cnn": _digits,
    "mobilenet_v2": lambda: ZooEntry("mobilenet_v2", mobilenet_v2, MOBILENET_V2_INPUT_SHAPE),
    "resnet18": lambda: ZooEntry("resnet18", resnet18, RESNET18_INPUT_SHAPE),
    "transformer_encoder": lambda: ZooEntry(
        "transformer_encoder", transformer_encoder, TRANSFORMER_INPUT_SHAPE
    ),
}


def names() -> tuple[str, ...]:
    """Names of every zoo model, sorted."""
    return tuple(sorted(_ENTRIES))


def get(name: str) -> ZooEntry:
    """The zoo entry called ``name``; ConfigError for an unknown name."""
    factory = _ENTRIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown zoo model {name!r}; available: {', '.join(names())}")
    return factory()
