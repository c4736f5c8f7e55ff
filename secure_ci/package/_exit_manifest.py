"""The exit heads in a package's manifest: pure data, validated field by field (no torch).

JSON shape (the manifest's ``"exits"``, null when the package has no exit heads)::

    {"sha256": "<64 hex>", "bytes": N,            of the exit heads section
     "training": {"source": str, "samples": n, "seed": s},
     "calibration": {"source": str, "samples": n, "accuracy": a},
     "heads": [{"cut": i, "pool": p, "classes": k, "head_ms": ms,
                "rows": [{"metric": "max_softmax", "threshold": t,
                          "p_exit": p, "accuracy_drop_pt": d}, ...]}, ...]}

The exit heads section is a safetensors file holding, for each head at cut ``i``, exactly
``exit.<i>.linear.weight`` (float32, ``classes`` x features) and ``exit.<i>.linear.bias``
(float32, ``classes``), where the features follow from the cut's boundary specs and ``pool``
as :class:`~secure_ci.partition.ExitHead` computes them.

Each row is one exit policy at that head, calibrated on the held-out ``calibration`` samples
(never on the ``training`` samples the heads were fitted on): ``p_exit`` is the fraction of
samples that exit, ``accuracy_drop_pt`` the full model's top-1 accuracy on those samples
minus the accuracy when exiting samples take the exit head's prediction (percentage points;
negative when exiting helped). ``head_ms`` is the exit head's median latency on one sample,
measured on the packing machine. The codec's drop is calibrated separately (the codec
table); the planner adds the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

from secure_ci.exceptions import PackageError, PartitionError
from secure_ci.package._manifest import (
    MAX_CUTS,
    Calibration,
    _fields,
    _int,
    _list,
    _num,
    _str,
)
from secure_ci.partition._plan import Cut, ExitMetric, ExitPolicy

__all__ = [
    "MAX_EXIT_CLASSES",
    "MAX_EXIT_HEADS",
    "MAX_EXIT_POOL",
    "MAX_EXIT_ROWS",
    "ExitHeadInfo",
    "ExitRow",
    "ExitTable",
    "ExitTraining",
    "exit_features",
    "exit_tensor_names",
]

MAX_EXIT_HEADS = 16
MAX_EXIT_ROWS = 64
MAX_EXIT_CLASSES = 1 << 16
MAX_EXIT_POOL = 64
MAX_EXIT_MS = 1e6
_HEX64 = re.compile(r"[0-9a-f]{64}")


def exit_tensor_names(cut: int) -> tuple[str, str]:
    """The names of an exit head's weight and bias in the exit heads section."""
    return f"exit.{cut}.linear.weight", f"exit.{cut}.linear.bias"


def exit_features(cut: Cut, pool: int) -> int:
    """The input width of the exit head at ``cut`` (as ExitHead computes it), or a
    :class:`PackageError` when no exit head fits the cut's boundary."""
    features = 0
    for spec in cut.boundary:
        if spec.dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise PackageError(f"exit head at cut {cut.index}: boundary is {spec.dtype}")
        if len(spec.shape) == 4:
            features += spec.shape[1] * min(pool, spec.shape[2]) * min(pool, spec.shape[3])
        elif len(spec.shape) in (2, 3):
            features += spec.shape[-1]
        else:
            raise PackageError(f"exit head at cut {cut.index}: boundary shape {spec.shape}")
    if not cut.boundary or features == 0:
        raise PackageError(f"exit head at cut {cut.index}: the boundary has no features")
    return features


@dataclass(frozen=True)
class ExitRow:
    """One exit policy's calibration: how often it exits and what that costs in accuracy."""

    metric: ExitMetric
    threshold: float
    p_exit: float
    accuracy_drop_pt: float

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "threshold": self.threshold,
            "p_exit": self.p_exit,
            "accuracy_drop_pt": self.accuracy_drop_pt,
        }

    @classmethod
    def from_json(cls, value: object) -> ExitRow:
        f = _fields(value, {"metric", "threshold", "p_exit", "accuracy_drop_pt"}, "exit row")
        if f["metric"] not in ("max_softmax", "entropy"):
            raise PackageError("exit row metric must be 'max_softmax' or 'entropy'")
        high = 1.0 if f["metric"] == "max_softmax" else 100.0
        return cls(
            metric=cast(ExitMetric, f["metric"]),
            threshold=_num(f["threshold"], "exit threshold", 0.0, high),
            p_exit=_num(f["p_exit"], "p_exit", 0.0, 1.0),
            accuracy_drop_pt=_num(f["accuracy_drop_pt"], "exit accuracy drop", -100.0, 100.0),
        )


@dataclass(frozen=True)
class ExitHeadInfo:
    """One exit head: where it sits, its shape parameters, its latency and its calibration."""

    cut: int
    pool: int
    classes: int
    head_ms: float
    rows: tuple[ExitRow, ...]

    def policy(self, row: ExitRow) -> ExitPolicy:
        return ExitPolicy(self.cut, row.metric, row.threshold)

    def to_json(self) -> dict[str, Any]:
        return {
            "cut": self.cut,
            "pool": self.pool,
            "classes": self.classes,
            "head_ms": self.head_ms,
            "rows": [row.to_json() for row in self.rows],
        }

    @classmethod
    def from_json(cls, value: object) -> ExitHeadInfo:
        f = _fields(value, {"cut", "pool", "classes", "head_ms", "rows"}, "exit head")
        rows = tuple(ExitRow.from_json(r) for r in _list(f["rows"], "exit rows", MAX_EXIT_ROWS))
        if not rows or len({(r.metric, r.threshold) for r in rows}) != len(rows):
            raise PackageError("an exit head needs distinct (metric, threshold) rows")
        return cls(
            cut=_int(f["cut"], "exit cut", 0, MAX_CUTS - 1),
            pool=_int(f["pool"], "exit pool", 1, MAX_EXIT_POOL),
            classes=_int(f["classes"], "exit classes", 2, MAX_EXIT_CLASSES),
            head_ms=_num(f["head_ms"], "exit head_ms", 0.0, MAX_EXIT_MS),
            rows=rows,
        )


@dataclass(frozen=True)
class ExitTraining:
    """The labelled samples the exit heads were fitted on, and the training seed."""

    source: str
    samples: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "samples": self.samples, "seed": self.seed}

    @classmethod
    def from_json(cls, value: object) -> ExitTraining:
        f = _fields(value, {"source", "samples", "seed"}, "exits.training")
        return cls(
            source=_str(f["source"], "exit training source"),
            samples=_int(f["samples"], "exit training samples", 1, 10_000_000),
            seed=_int(f["seed"], "exit training seed", 0, (1 << 63) - 1),
        )


@dataclass(frozen=True)
class ExitTable:
    """The manifest's description of the exit heads section."""

    sha256: str
    nbytes: int
    training: ExitTraining
    calibration: Calibration
    heads: tuple[ExitHeadInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "training": self.training.to_json(),
            "calibration": self.calibration.to_json(),
            "heads": [head.to_json() for head in self.heads],
        }

    @classmethod
    def from_json(cls, value: object) -> ExitTable:
        keys = {"sha256", "bytes", "training", "calibration", "heads"}
        f = _fields(value, keys, "exits")
        heads = _list(f["heads"], "exit heads", MAX_EXIT_HEADS)
        return cls(
            sha256=_str(f["sha256"], "exits.sha256", _HEX64),
            nbytes=_int(f["bytes"], "exits.bytes", 1, 1 << 40),
            training=ExitTraining.from_json(f["training"]),
            calibration=Calibration.from_json(f["calibration"]),
            heads=tuple(ExitHeadInfo.from_json(h) for h in heads),
        )

    def check(self, cuts: tuple[Cut, ...]) -> None:
        """Heads sit at distinct cuts of the model (ascending), each shaped for its boundary."""
        if not self.heads:
            raise PackageError("an exits table must hold at least one exit head")
        indices = [head.cut for head in self.heads]
        if indices != sorted(set(indices)) or indices[-1] >= len(cuts):
            raise PackageError(f"exit heads at cuts {indices[:8]} are not distinct model cuts")
        if len({head.classes for head in self.heads}) != 1:
            raise PackageError("exit heads disagree on the number of classes")
        for head in self.heads:
            exit_features(cuts[head.cut], head.pool)
            for row in head.rows:
                try:
                    head.policy(row)
                except PartitionError as exc:
                    raise PackageError(f"exit head at cut {head.cut}: {exc}") from None
