"""The plan half of the split engine: pure, hashable data that never imports torch.

A :class:`PartitionPlan` says which model (by ``model_id``), where to cut, how to encode the
boundary tensors and when to exit early. It has exactly one canonical encoding (CBOR) and a
digest, so a device, an edge and an auditor that hold the same plan agree on its bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from secure_ci._encoding import canonical_cbor, decode_cbor, digest
from secure_ci.exceptions import PartitionError, SecureCIError

__all__ = ["Cut", "ExitPolicy", "PartitionPlan", "TensorSpec"]

PLAN_VERSION = 1
MAX_PLAN_BYTES = 4096
MAX_CUT_INDEX = (1 << 31) - 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CODEC = re.compile(r"[a-z0-9]{1,16}(\+[a-z0-9]{1,16}){0,3}")
_DTYPES = frozenset(
    {
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "bool",
        "complex64",
        "complex128",
    }
)
ExitMetric = Literal["max_softmax", "entropy"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_index(value: object, what: str) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_CUT_INDEX:  # type: ignore[operator]
        raise PartitionError(f"{what} must be an integer in [0, {MAX_CUT_INDEX}], got {value!r}")


@dataclass(frozen=True)
class TensorSpec:
    """Shape (including the batch dimension of the example) and dtype of one tensor.

    ``batch_dim`` is the dimension that follows the batch size (not always the first: after
    a ``permute`` it moves), or None when the tensor has none, so samples cannot be batched.
    """

    shape: tuple[int, ...]
    dtype: str
    batch_dim: int | None = 0

    def __post_init__(self) -> None:
        if not all(_is_int(d) and d >= 0 for d in self.shape):
            raise PartitionError(f"tensor shape must be non-negative integers: {self.shape!r}")
        if self.dtype not in _DTYPES:
            raise PartitionError(f"unsupported tensor dtype {self.dtype!r}")
        if self.batch_dim is not None and (
            not _is_int(self.batch_dim) or not 0 <= self.batch_dim < len(self.shape)
        ):
            raise PartitionError(
                f"batch dimension {self.batch_dim!r} is not a dimension of shape {self.shape}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "batch_dim": self.batch_dim}


@dataclass(frozen=True)
class Cut:
    """A cut after node ``name`` (position ``index`` among the model's cuts).

    ``boundary`` lists the tensors the head hands to the tail (several with skip
    connections); ``nbytes`` is their float32 size for the example batch. ``bottleneck``
    marks a boundary smaller than the input and than the neighbouring cuts.
    """

    index: int
    name: str
    boundary: tuple[TensorSpec, ...]
    boundary_names: tuple[str, ...]
    nbytes: int
    head_flops_share: float
    head_params_share: float
    bottleneck: bool

    def __post_init__(self) -> None:
        _check_index(self.index, "cut index")
        if not self.boundary or len(self.boundary) != len(self.boundary_names):
            raise PartitionError(f"cut {self.name!r} needs one name per boundary tensor")
        for share in (self.head_flops_share, self.head_params_share):
            if not 0.0 <= share <= 1.0:
                raise PartitionError(f"cut {self.name!r}: share {share} outside [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "boundary": [spec.to_json() for spec in self.boundary],
            "boundary_names": list(self.boundary_names),
            "nbytes": self.nbytes,
            "head_flops_share": self.head_flops_share,
            "head_params_share": self.head_params_share,
            "bottleneck": self.bottleneck,
        }


@dataclass(frozen=True)
class ExitPolicy:
    """Exit early at ``cut`` when the exit head is confident enough.

    ``max_softmax``: exit when the largest class probability is at least ``threshold``
    (in [0, 1]). ``entropy``: exit when the prediction entropy (nats) is at most
    ``threshold`` (>= 0).
    """

    cut: int
    metric: ExitMetric
    threshold: float

    def __post_init__(self) -> None:
        _check_index(self.cut, "exit cut")
        if self.metric not in ("max_softmax", "entropy"):
            raise PartitionError(f"unknown exit metric {self.metric!r}")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise PartitionError(f"exit threshold must be a number, got {threshold!r}")
        if not math.isfinite(threshold) or threshold < 0:
            raise PartitionError(f"exit threshold must be finite and >= 0, got {threshold}")
        if self.metric == "max_softmax" and threshold > 1:
            raise PartitionError(f"max_softmax threshold must be <= 1, got {threshold}")
        object.__setattr__(self, "threshold", float(threshold))

    def to_cbor(self) -> dict[str, Any]:
        return {"cut": self.cut, "metric": self.metric, "threshold": self.threshold}


@dataclass(frozen=True)
class PartitionPlan:
    """Which model, where to cut, which boundary codec, and the optional early exit."""

    model_id: str
    cut: int
    codec: str
    exit_policy: ExitPolicy | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not _HEX64.fullmatch(self.model_id):
            raise PartitionError("model_id must be 64 lowercase hex digits (SHA-256)")
        _check_index(self.cut, "plan cut")
        if not isinstance(self.codec, str) or not _CODEC.fullmatch(self.codec):
            raise PartitionError(f"malformed codec name {self.codec!r} (e.g. 'int8+zstd')")
        if self.exit_policy is not None:
            if not isinstance(self.exit_policy, ExitPolicy):
                raise PartitionError("exit_policy must be an ExitPolicy or None")
            if self.exit_policy.cut > self.cut:
                raise PartitionError(
                    f"exit cut {self.exit_policy.cut} lies beyond the split at cut {self.cut}"
                )

    def _as_map(self) -> dict[str, Any]:
        return {
            "v": PLAN_VERSION,
            "model_id": self.model_id,
            "cut": self.cut,
            "codec": self.codec,
            "exit": None if self.exit_policy is None else self.exit_policy.to_cbor(),
        }

    def encode(self) -> bytes:
        """The one canonical encoding (canonical CBOR)."""
        return canonical_cbor(self._as_map())

    @property
    def digest(self) -> str:
        """Hex, domain-separated SHA-256 of the canonical encoding."""
        return digest("partition/plan", self._as_map()).hex()

    @classmethod
    def decode(cls, data: bytes) -> PartitionPlan:
        """Parse and validate an encoded plan; anything malformed raises PartitionError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PartitionError(f"plan must be bytes, got {type(data).__name__}")
        try:
            value = decode_cbor(bytes(data), max_bytes=MAX_PLAN_BYTES)
        except SecureCIError as exc:
            raise PartitionError(f"malformed partition plan: {exc}") from exc
        fields = _expect_map(value, {"v", "model_id", "cut", "codec", "exit"}, "plan")
        if fields["v"] != PLAN_VERSION or not _is_int(fields["v"]):
            raise PartitionError(f"unsupported partition plan version {fields['v']!r}")
        exit_policy = None
        if fields["exit"] is not None:
            ex = _expect_map(fields["exit"], {"cut", "metric", "threshold"}, "exit policy")
            if not isinstance(ex["threshold"], float):
                raise PartitionError("exit threshold must be encoded as a float")
            exit_policy = ExitPolicy(cut=ex["cut"], metric=ex["metric"], threshold=ex["threshold"])
        return cls(
            model_id=fields["model_id"],
            cut=fields["cut"],
            codec=fields["codec"],
            exit_policy=exit_policy,
        )


def _expect_map(value: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PartitionError(f"{what} must be a map, got {type(value).__name__}")
    if set(value) != keys:
        raise PartitionError(f"{what} has keys {sorted(map(str, value))}, expected {sorted(keys)}")
    return value
