"""The split engine: where to cut a model, and the head/tail modules for a cut.

The plan half (:class:`PartitionPlan`, :class:`Cut`, :class:`TensorSpec`, :class:`ExitPolicy`,
:class:`Profile`) is pure data and importing it never imports torch. The runtime half
(:class:`Partitioner`, :func:`profile`, feature codecs, early exits) imports torch and is
loaded lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from secure_ci.partition._canonical import (
    DEFAULT_CANONICAL,
    CanonicalRule,
    canonical_bytes,
    default_canonical,
    parse_canonical,
)
from secure_ci.partition._plan import Cut, ExitPolicy, PartitionPlan, TensorSpec
from secure_ci.partition._profiles import CutProfile, Profile

if TYPE_CHECKING:
    from secure_ci.partition._partitioner import Partitioner
    from secure_ci.partition._profiler import profile
    from secure_ci.partition._stage import Stage

__all__ = [
    "CODECS",
    "DEFAULT_CANONICAL",
    "CanonicalRule",
    "Cut",
    "CutProfile",
    "ExitHead",
    "ExitPolicy",
    "PartitionPlan",
    "Partitioner",
    "Profile",
    "Stage",
    "TensorSpec",
    "attach_exit",
    "canonical_bytes",
    "decode_features",
    "default_canonical",
    "encode_features",
    "parse_canonical",
    "profile",
    "should_exit",
    "train_exit_heads",
]

_LAZY = {
    "Partitioner": "secure_ci.partition._partitioner",
    "Stage": "secure_ci.partition._stage",
    "profile": "secure_ci.partition._profiler",
    "encode_features": "secure_ci.partition._codec",
    "decode_features": "secure_ci.partition._codec",
    "CODECS": "secure_ci.partition._codec",
    "ExitHead": "secure_ci.partition._exits",
    "attach_exit": "secure_ci.partition._exits",
    "train_exit_heads": "secure_ci.partition._exits",
    "should_exit": "secure_ci.partition._exits",
}


def __getattr__(name: str) -> Any:
    """Import the torch-using half only when one of its names is first used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
