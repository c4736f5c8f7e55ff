"""Registered tails: which (model, cut) this edge serves, and running a batch of them.

A tail is loaded once at start and then only read. Incoming features are decoded with the
registered boundary specs as ``expected`` (shape and dtype checked from the codec header,
before any tensor is allocated), so a wrong tensor never reaches torch. Each request carries
one sample (batch dimension 1); a batch concatenates samples along dimension 0, runs the tail
once, and splits the output back per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from secure_ci.exceptions import CodecError, ConfigError, ProtocolError
from secure_ci.partition import Partitioner
from secure_ci.partition._codec import CODECS, decode_features, encode_features
from secure_ci.partition._plan import TensorSpec
from secure_ci.protocol._codes import ErrorCode

__all__ = ["ModelRegistry", "TailEntry", "load_zoo_tails", "tails_from_partitioner"]

Features = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class TailEntry:
    """One servable (model, cut): the tail module and what it accepts."""

    model_id: bytes
    cut: int
    tail: torch.nn.Module = field(repr=False, compare=False)
    inputs: tuple[TensorSpec, ...]
    codecs: frozenset[str]
    output_codec: str = "float32"

    def __post_init__(self) -> None:
        if len(self.model_id) != 32 or not 0 <= self.cut < 1 << 16:
            raise ConfigError("a tail needs a 32-byte model id and a uint16 cut")
        if not self.inputs or any(s.shape[:1] != (1,) for s in self.inputs):
            raise ConfigError("tail inputs must be per-sample specs with batch dimension 1")
        unknown = (set(self.codecs) | {self.output_codec}) - set(CODECS)
        if unknown or not self.codecs:
            raise ConfigError(f"unknown codecs {sorted(unknown)}; known: {', '.join(CODECS)}")

    @property
    def max_feature_bytes(self) -> int:
        """Upper bound of decoded feature bytes for one request (float64-safe margin)."""
        return sum(8 * s.numel for s in self.inputs) + 4096

    def decode(self, codec: str, payload: bytes) -> Features:
        """Decode one request's features; anything unexpected is ``BAD_TENSOR``."""
        if codec not in self.codecs:
            raise ProtocolError(f"codec {codec!r} is not served", code=ErrorCode.BAD_TENSOR)
        try:
            return decode_features(payload, max_bytes=self.max_feature_bytes, expected=self.inputs)
        except CodecError as exc:
            raise ProtocolError(f"bad features: {exc}", code=ErrorCode.BAD_TENSOR) from None

    def run_batch(self, batch: Sequence[Features]) -> list[bytes]:
        """Run the tail once over ``batch`` and return each request's encoded output."""
        columns = [torch.cat(parts, dim=0) for parts in zip(*batch, strict=True)]
        with torch.inference_mode():
            out = self.tail(*columns)
        outputs = _flatten(out)
        return [
            encode_features([o[i : i + 1] for o in outputs], self.output_codec)
            for i in range(len(batch))
        ]


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flatten(value[k])]
    raise ProtocolError(f"tail returned {type(value).__name__}", code=ErrorCode.INTERNAL)


class ModelRegistry:
    """The tails this edge serves, keyed by (model_id, cut); filled once before serving."""

    def __init__(self) -> None:
        self._tails: dict[tuple[bytes, int], TailEntry] = {}

    def add(self, entry: TailEntry) -> None:
        key = (entry.model_id, entry.cut)
        if key in self._tails:
            raise ConfigError(f"model {entry.model_id.hex()} cut {entry.cut} registered twice")
        entry.tail.eval()
        self._tails[key] = entry

    def get(self, model_id: bytes, cut: int) -> TailEntry:
        entry = self._tails.get((model_id, cut))
        if entry is None:
            raise ProtocolError(
                f"model {model_id.hex()[:16]}.. cut {cut} is not served",
                code=ErrorCode.UNKNOWN_MODEL,
            )
        return entry

    def entries(self) -> list[TailEntry]:
        return list(self._tails.values())

    def __len__(self) -> int:
        return len(self._tails)


def tails_from_partitioner(
    partitioner: Partitioner, cuts: Sequence[int], codecs: Sequence[str]
) -> list[TailEntry]:
    """Split at each cut; the boundary specs come from the partitioner's analysis."""
    model_id = bytes.fromhex(partitioner.model_id)
    tails = []
    for cut in cuts:
        _, tail = partitioner.split(cut)
        specs = tuple(partitioner.cut(cut).boundary)
        tails.append(TailEntry(model_id, cut, tail, specs, frozenset(codecs)))
    return tails


def load_zoo_tails(
    name: str, cuts: Sequence[int], codecs: Sequence[str], seed: int
) -> list[TailEntry]:
    """Build zoo model ``name`` (weights drawn from ``seed``) and split it at each cut."""
    from secure_ci.zoo import get

    entry = get(name)
    torch.manual_seed(seed)
    model = entry.build()
    return tails_from_partitioner(
        Partitioner(model, (torch.zeros(entry.input_shape),)), cuts, codecs
    )
