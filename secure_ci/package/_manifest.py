"""The manifest of a model package: pure data, validated field by field (never imports torch).

JSON shape (canonical JSON in the file, see :mod:`secure_ci.package._format`)::

    {"architecture": {"kind": "zoo", "name": "digits_cnn"},
     "input": {"shape": [1, 1, 32, 32], "dtype": "float32"},
     "model_id": "<64 hex>",                     Partitioner.model_id: architecture + weights
     "weights": {"sha256": "<64 hex>", "bytes": N, "tensors": K, "parameters": P},
     "analysis": {"total_flops": F, "total_params": P,
                  "cuts": [Cut.to_json(), ...]},   boundary specs with batch_dim
     "profiles": [Profile.to_json(), ...],       measured on the packing machine
     "codecs": {"measured_on": "calibration" | "random",
                "calibration": null | {"source": str, "samples": n, "accuracy": a},
                "rows": [{"cut": i, "codec": "int8", "bytes": b, "ratio": r,
                          "accuracy_drop_pt": d | null}, ...]},
     "exits": null | {...},                      see secure_ci.package._exit_manifest
     "canonical": {"kind": "topk", "k": K} | {"kind": "quantize", "step": S},
                                                 optional, see secure_ci.partition._canonical
     "created_with": {"secure_ci": "0.1.0", "torch": "2.13.0+cpu"}}

A version 1 file's manifest has no ``"exits"`` key; a version 2 file's always has one.
``"canonical"`` (the rule that maps an output to the bytes honest edges agree on, which
disputes compare) is optional in both: without it the model's rule is
:data:`~secure_ci.partition.DEFAULT_CANONICAL` (top-1 index of each output row).

Each boundary tensor spec says which dimension follows the batch (``batch_dim``, null when
samples cannot be batched).
``bytes`` is the mean encoded size of one sample's boundary, ``ratio`` that size over the
float32 boundary bytes, ``accuracy_drop_pt`` the top-1 accuracy lost on the calibration set
in percentage points (null without one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from secure_ci.exceptions import PackageError, PartitionError
from secure_ci.partition._canonical import DEFAULT_CANONICAL, CanonicalRule
from secure_ci.partition._plan import Cut, TensorSpec
from secure_ci.partition._profiles import Profile

if TYPE_CHECKING:
    from secure_ci.package._exit_manifest import ExitTable

__all__ = ["Calibration", "CodecRow", "PackageManifest"]

MAX_CUTS = 4096
MAX_BOUNDARY = 255
MAX_PROFILES = 8
MAX_CODEC_ROWS = 1 << 16
MAX_INPUT_ELEMENTS = 1 << 26
MAX_NAME = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CODEC = re.compile(r"[a-z0-9]{1,16}(\+[a-z0-9]{1,16}){0,3}")
_ZOO_NAME = re.compile(r"[a-z0-9_]{1,64}")
CodecInputs = Literal["calibration", "random"]


def _fields(value: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        got = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise PackageError(f"{what} must have exactly the keys {sorted(keys)}, got {got}")
    return value


def _int(value: object, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PackageError(f"{what} must be an integer in {low}..{high}, got {value!r:.40}")
    return value


def _num(value: object, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PackageError(f"{what} must be a number, got {value!r:.40}")
    if not low <= value <= high:  # exact for ints of any size; NaN fails too
        raise PackageError(f"{what} must be in {low}..{high}, got {value!r:.40}")
    return float(value)


def _str(value: object, what: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise PackageError(f"{what} must be a string of 1..{MAX_NAME} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise PackageError(f"{what} is malformed: {value[:64]!r}")
    return value


def _list(value: object, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise PackageError(f"{what} must be a list of at most {limit} items")
    return value


@dataclass(frozen=True)
class Calibration:
    """The labelled set the codec table's accuracy was measured on."""

    source: str
    samples: int
    accuracy: float

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "samples": self.samples, "accuracy": self.accuracy}

    @classmethod
    def from_json(cls, value: object) -> Calibration:
        f = _fields(value, {"source", "samples", "accuracy"}, "codecs.calibration")
        return cls(
            source=_str(f["source"], "calibration source"),
            samples=_int(f["samples"], "calibration samples", 1, 10_000_000),
            accuracy=_num(f["accuracy"], "calibration accuracy", 0.0, 1.0),
        )


@dataclass(frozen=True)
class CodecRow:
    """What one codec costs at one cut: bytes per sample and accuracy drop (points)."""

    cut: int
    codec: str
    nbytes: float
    ratio: float
    accuracy_drop_pt: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "cut": self.cut,
            "codec": self.codec,
            "bytes": self.nbytes,
            "ratio": self.ratio,
            "accuracy_drop_pt": self.accuracy_drop_pt,
        }

    @classmethod
    def from_json(cls, value: object) -> CodecRow:
        f = _fields(value, {"cut", "codec", "bytes", "ratio", "accuracy_drop_pt"}, "codec row")
        drop = f["accuracy_drop_pt"]
        return cls(
            cut=_int(f["cut"], "codec row cut", 0, MAX_CUTS - 1),
            codec=_str(f["codec"], "codec name", _CODEC),
            nbytes=_num(f["bytes"], "codec bytes", 0.0, 1e15),
            ratio=_num(f["ratio"], "codec ratio", 0.0, 1e6),
            accuracy_drop_pt=None if drop is None else _num(drop, "accuracy drop", -100, 100),
        )


@dataclass(frozen=True)
class PackageManifest:
    """Everything a package says about its model, apart from the weights themselves."""

    architecture: str
    input_shape: tuple[int, ...]
    model_id: str
    weights_sha256: str
    weights_bytes: int
    weights_tensors: int
    weights_parameters: int
    total_flops: int
    total_params: int
    cuts: tuple[Cut, ...]
    profiles: tuple[Profile, ...]
    codec_inputs: CodecInputs
    calibration: Calibration | None
    codecs: tuple[CodecRow, ...]
    created_with: Mapping[str, str]
    exits: ExitTable | None = None
    canonical: CanonicalRule | None = None
    """The model's canonical output rule; None: the manifest has no ``"canonical"`` key."""

    @property
    def canonical_rule(self) -> CanonicalRule:
        """The rule in force: the manifest's, else :data:`DEFAULT_CANONICAL`."""
        return DEFAULT_CANONICAL if self.canonical is None else self.canonical

    def to_json(self) -> dict[str, Any]:
        cuts = [cut.to_json() for cut in self.cuts]
        extra = {} if self.canonical is None else {"canonical": self.canonical.to_json()}
        return extra | {
            "architecture": {"kind": "zoo", "name": self.architecture},
            "input": {"shape": list(self.input_shape), "dtype": "float32"},
            "model_id": self.model_id,
            "weights": {
                "sha256": self.weights_sha256,
                "bytes": self.weights_bytes,
                "tensors": self.weights_tensors,
                "parameters": self.weights_parameters,
            },
            "analysis": {
                "total_flops": self.total_flops,
                "total_params": self.total_params,
                "cuts": cuts,
            },
            "profiles": [p.to_json() for p in self.profiles],
            "codecs": {
                "measured_on": self.codec_inputs,
                "calibration": None if self.calibration is None else self.calibration.to_json(),
                "rows": [row.to_json() for row in self.codecs],
            },
            "exits": None if self.exits is None else self.exits.to_json(),
            "created_with": dict(self.created_with),
        }

    @classmethod
    def from_json(cls, value: object, *, exits_key: bool = True) -> PackageManifest:
        """Validate a parsed manifest; anything unexpected is a :class:`PackageError`.

        ``exits_key``: whether the manifest has an ``"exits"`` key (format version 2) or not
        (version 1)."""
        from secure_ci.package._exit_manifest import ExitTable  # it builds on this module

        top = {"architecture", "input", "model_id", "weights", "analysis", "profiles"}
        top |= {"codecs", "created_with"} | ({"exits"} if exits_key else set())
        if isinstance(value, dict) and "canonical" in value:
            top.add("canonical")
        f = _fields(value, top, "manifest")
        arch = _fields(f["architecture"], {"kind", "name"}, "architecture")
        if arch["kind"] != "zoo":
            raise PackageError(f"architecture kind {str(arch['kind'])[:32]!r} is not supported")
        inp = _fields(f["input"], {"shape", "dtype"}, "input")
        if inp["dtype"] != "float32":
            raise PackageError("input dtype must be float32")
        weights = _fields(f["weights"], {"sha256", "bytes", "tensors", "parameters"}, "weights")
        analysis = _fields(f["analysis"], {"total_flops", "total_params", "cuts"}, "analysis")
        codecs = _fields(f["codecs"], {"measured_on", "calibration", "rows"}, "codecs")
        if codecs["measured_on"] not in ("calibration", "random"):
            raise PackageError("codecs.measured_on must be 'calibration' or 'random'")
        created = f["created_with"]
        if not isinstance(created, dict) or len(created) > 16:
            raise PackageError("created_with must be a small map of strings")
        cuts = _cuts(_list(analysis["cuts"], "analysis.cuts", MAX_CUTS))
        calibration = codecs["calibration"]
        try:
            profiles = tuple(
                Profile.from_json(p) for p in _list(f["profiles"], "profiles", MAX_PROFILES)
            )
        except (PartitionError, OverflowError) as exc:  # OverflowError: a huge int timing
            raise PackageError(f"malformed profile: {exc}") from None
        manifest = cls(
            architecture=_str(arch["name"], "architecture name", _ZOO_NAME),
            input_shape=_input_shape(inp["shape"]),
            model_id=_str(f["model_id"], "model_id", _HEX64),
            weights_sha256=_str(weights["sha256"], "weights.sha256", _HEX64),
            weights_bytes=_int(weights["bytes"], "weights.bytes"),
            weights_tensors=_int(weights["tensors"], "weights.tensors"),
            weights_parameters=_int(weights["parameters"], "weights.parameters"),
            total_flops=_int(analysis["total_flops"], "analysis.total_flops"),
            total_params=_int(analysis["total_params"], "analysis.total_params"),
            cuts=cuts,
            profiles=profiles,
            codec_inputs=codecs["measured_on"],
            calibration=None if calibration is None else Calibration.from_json(calibration),
            codecs=tuple(
                CodecRow.from_json(r) for r in _list(codecs["rows"], "codec rows", MAX_CODEC_ROWS)
            ),
            created_with={
                _str(k, "created_with key"): _str(v, "created_with value")
                for k, v in created.items()
            },
            exits=None if f.get("exits") is None else ExitTable.from_json(f["exits"]),
            canonical=None if "canonical" not in f else CanonicalRule.from_json(f["canonical"]),
        )
        manifest.check()
        return manifest

    def check(self) -> None:
        """Cross-field consistency: profiles and codec rows refer to this model's cuts."""
        names = [cut.name for cut in self.cuts]
        for p in self.profiles:
            if p.model_id != self.model_id:
                raise PackageError("a profile was measured on another model_id")
            if [c.name for c in p.cuts] != names:
                raise PackageError("a profile's cuts differ from the package's cuts")
        seen = set()
        for row in self.codecs:
            if row.cut >= len(self.cuts) or (row.cut, row.codec) in seen:
                raise PackageError(f"codec row for cut {row.cut} {row.codec} is out of place")
            seen.add((row.cut, row.codec))
        if (self.calibration is None) != (self.codec_inputs == "random"):
            raise PackageError("codecs measured on a calibration set must describe it")
        if self.exits is not None:
            self.exits.check(self.cuts)


def _input_shape(value: object) -> tuple[int, ...]:
    dims = _list(value, "input shape", 8)
    shape = tuple(_int(d, "input dimension", 1, MAX_INPUT_ELEMENTS) for d in dims)
    if not shape or shape[0] != 1 or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise PackageError(f"input shape {shape} must be one sample (1, ...) of bounded size")
    return shape


def _cuts(values: list[Any]) -> tuple[Cut, ...]:
    cuts = []
    keys = {"index", "name", "boundary", "boundary_names", "nbytes", "head_flops_share",
            "head_params_share", "bottleneck"}  # fmt: skip
    for position, value in enumerate(values):
        f = _fields(value, keys, f"cut {position}")
        boundary = _list(f["boundary"], "cut boundary", MAX_BOUNDARY)
        names = _list(f["boundary_names"], "cut boundary names", MAX_BOUNDARY)
        if not isinstance(f["bottleneck"], bool):
            raise PackageError(f"cut {position}: bottleneck must be true or false")
        try:
            cuts.append(
                Cut(
                    index=_int(f["index"], "cut index", position, position),
                    name=_str(f["name"], "cut name"),
                    boundary=tuple(_spec(s) for s in boundary),
                    boundary_names=tuple(_str(n, "boundary name") for n in names),
                    nbytes=_int(f["nbytes"], "cut nbytes"),
                    head_flops_share=_num(f["head_flops_share"], "head_flops_share", 0.0, 1.0),
                    head_params_share=_num(f["head_params_share"], "head_params_share", 0, 1),
                    bottleneck=f["bottleneck"],
                )
            )
        except PartitionError as exc:
            raise PackageError(f"cut {position}: {exc}") from None
    return tuple(cuts)


def _spec(value: object) -> TensorSpec:
    f = _fields(value, {"shape", "dtype", "batch_dim"}, "boundary tensor")
    shape = tuple(_int(d, "boundary dimension", 0, 1 << 40) for d in _list(f["shape"], "shape", 8))
    if not isinstance(f["dtype"], str):
        raise PackageError("boundary dtype must be a string")
    batch = f["batch_dim"]
    try:
        return TensorSpec(
            shape=shape,
            dtype=f["dtype"],
            batch_dim=None if batch is None else _int(batch, "batch_dim", 0, 7),
        )
    except PartitionError as exc:
        raise PackageError(str(exc)) from None
