"""Latency profiles of every cut: pure data for the planner, serialisable to JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from secure_ci.exceptions import PartitionError

__all__ = ["CutProfile", "Profile"]

PROFILE_VERSION = 1


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PartitionError(f"profile field {what} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PartitionError(f"profile field {what} must be finite and >= 0, got {value}")
    return float(value)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PartitionError(f"profile field {what} must be a non-negative integer: {value!r}")
    return value


@dataclass(frozen=True)
class CutProfile:
    """Median head and tail latency (ms) at one cut, and the float32 boundary bytes."""

    index: int
    name: str
    head_ms: float
    tail_ms: float
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "head_ms": self.head_ms,
            "tail_ms": self.tail_ms,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, data: object) -> CutProfile:
        if not isinstance(data, dict) or set(data) != {
            "index",
            "name",
            "head_ms",
            "tail_ms",
            "nbytes",
        }:
            raise PartitionError(f"malformed cut profile: {data!r:.200}")
        if not isinstance(data["name"], str):
            raise PartitionError("cut profile name must be a string")
        return cls(
            index=_count(data["index"], "index"),
            name=data["name"],
            head_ms=_number(data["head_ms"], "head_ms"),
            tail_ms=_number(data["tail_ms"], "tail_ms"),
            nbytes=_count(data["nbytes"], "nbytes"),
        )


@dataclass(frozen=True)
class Profile:
    """Per-cut latencies of one model measured on one machine with ``threads`` threads."""

    model_id: str
    threads: int
    batch: int
    repeats: int
    full_ms: float
    cuts: tuple[CutProfile, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "model_id": self.model_id,
            "threads": self.threads,
            "batch": self.batch,
            "repeats": self.repeats,
            "full_ms": self.full_ms,
            "cuts": [cut.to_json() for cut in self.cuts],
        }

    @classmethod
    def from_json(cls, data: object) -> Profile:
        """Validate and rebuild a profile written by :meth:`to_json`."""
        keys = {"version", "model_id", "threads", "batch", "repeats", "full_ms", "cuts"}
        if not isinstance(data, dict) or set(data) != keys:
            raise PartitionError(f"malformed profile: expected keys {sorted(keys)}")
        if data["version"] != PROFILE_VERSION:
            raise PartitionError(f"unsupported profile version {data['version']!r}")
        if not isinstance(data["model_id"], str) or not isinstance(data["cuts"], list):
            raise PartitionError("malformed profile: model_id must be a string, cuts a list")
        cuts = tuple(CutProfile.from_json(c) for c in data["cuts"])
        if [c.index for c in cuts] != list(range(len(cuts))):
            raise PartitionError("malformed profile: cut indices must be 0, 1, 2, ...")
        return cls(
            model_id=data["model_id"],
            threads=_count(data["threads"], "threads"),
            batch=_count(data["batch"], "batch"),
            repeats=_count(data["repeats"], "repeats"),
            full_ms=_number(data["full_ms"], "full_ms"),
            cuts=cuts,
        )
