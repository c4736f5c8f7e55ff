"""Canonical outputs: the bytes honest edges agree on, which disputes compare.

Two honest edges that run the same model on the same input must be seen to agree on chain,
whatever their batch size. So each model carries a **canonical rule** (in its package
manifest, ``"canonical"``) that maps a decoded output to bytes:

- ``{"kind": "topk", "k": K}``: per output tensor, the indices of the K largest values of
  each row (the last dimension; a scalar is one row of one), largest first, ties broken by
  the lowest index, NaN below every number; K larger than a row takes the whole row. Robust
  to the rounding noise of different batch sizes unless two values are within that noise.
- ``{"kind": "quantize", "step": S}``: every value as ``round(x / S)`` (half to even, in
  float64) clamped to int32 ``[-2**31 + 1, 2**31 - 1]`` (so +-inf clamp), NaN as the sentinel
  ``-2**31``. Values within rounding noise of a boundary ``(n + 1/2) * S`` can land on either
  side in different batch sizes: prefer ``topk`` where it means something.

Canonical bytes: ``rule || uint8 tensors || per tensor (uint8 ndim || uint32 dims || body)``
(big-endian), ``rule`` = ``"T" || uint16 K`` or ``"Q" || float64 S``; a topk body holds
uint32 indices row by row, a quantize body int32 values in row-major order.

The rule is pure data (importing this module never imports torch); :func:`canonical_bytes`
decodes a payload (``decode_features``) and applies the rule: a pure function of the bytes,
so the edge (from what it sends) and the device (from what it got) compute the same.
The commitment built on it is in :mod:`secure_ci.ledger._canonical`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from secure_ci.exceptions import PackageError, RecordError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_CANONICAL",
    "DEFAULT_QUANTIZE_STEP",
    "CanonicalRule",
    "canonical_bytes",
    "default_canonical",
    "parse_canonical",
]

MAX_TOPK = 0xFFFF
MIN_STEP = 2.0**-64
MAX_STEP = 2.0**64
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_K = struct.Struct(">H")
_STEP = struct.Struct(">d")
_SMALL = 256


@dataclass(frozen=True)
class CanonicalRule:
    """How a model's decoded output becomes the canonical bytes edges must agree on."""

    kind: Literal["topk", "quantize"]
    k: int = 0
    step: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == "topk":
            k = self.k
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOPK:
                raise PackageError(f"canonical topk k must be an integer in 1..{MAX_TOPK}")
            if self.step != 0.0:
                raise PackageError("a canonical topk rule has no step")
        elif self.kind == "quantize":
            step = self.step
            if (
                isinstance(step, bool)
                or not isinstance(step, float)
                or not math.isfinite(step)
                or not MIN_STEP <= step <= MAX_STEP
            ):
                raise PackageError(
                    f"canonical quantize step must be in 2**-64..2**64: {step!r:.40}"
                )
            if self.k != 0:
                raise PackageError("a canonical quantize rule has no k")
        else:
            raise PackageError(f"canonical kind must be 'topk' or 'quantize': {self.kind!r:.40}")

    @classmethod
    def from_json(cls, value: object) -> CanonicalRule:
        """The rule of a manifest's ``"canonical"`` value; anything else is a PackageError."""
        if not isinstance(value, dict):
            raise PackageError("canonical must be an object")
        kind = value.get("kind")
        if kind == "topk" and set(value) == {"kind", "k"}:
            k = value["k"]
            if isinstance(k, bool) or not isinstance(k, int):
                raise PackageError("canonical topk k must be an integer")
            return cls("topk", k=k)
        if kind == "quantize" and set(value) == {"kind", "step"}:
            step = value["step"]
            if isinstance(step, bool) or not isinstance(step, int | float):
                raise PackageError("canonical quantize step must be a number")
            try:
                return cls("quantize", step=float(step))
            except OverflowError:
                raise PackageError("canonical quantize step is out of range") from None
        raise PackageError(
            "canonical must be {'kind': 'topk', 'k': K} or {'kind': 'quantize', 'step': S}"
        )

    def to_json(self) -> dict[str, Any]:
        if self.kind == "topk":
            return {"kind": "topk", "k": self.k}
        return {"kind": "quantize", "step": self.step}

    def header(self) -> bytes:
        """The rule's own bytes at the start of every canonical encoding."""
        return b"T" + _K.pack(self.k) if self.kind == "topk" else b"Q" + _STEP.pack(self.step)

    def encode(self, arrays: Sequence[np.ndarray[Any, Any]]) -> bytes:
        """The canonical bytes of decoded output tensors (any real dtype)."""
        return self._encode(
            [(a.shape, a.reshape(-1).tolist() if a.size <= _SMALL else a) for a in arrays]
        )

    def _encode(self, tensors: Sequence[tuple[tuple[int, ...], Any]]) -> bytes:
        """``tensors``: (shape, values): a flat list of floats, or an array when large."""
        if len(tensors) > 255:
            raise RecordError("a canonical output has at most 255 tensors")
        parts = [self.header(), bytes((len(tensors),))]
        for shape, values in tensors:
            if len(shape) > 255:
                raise RecordError("a canonical output tensor has at most 255 dimensions")
            parts.append(struct.pack(f">B{len(shape)}I", len(shape), *shape))
            small = isinstance(values, list)
            if self.kind == "topk":
                parts.append(_topk_small(values, shape, self.k) if small else self._topk(values))
            else:
                parts.append(
                    _quantize_small(values, self.step) if small else self._quantize(values)
                )
        return b"".join(parts)

    def _topk(self, array: np.ndarray[Any, Any]) -> bytes:
        import numpy as np  # here: importing this module stays numpy-free

        width = array.shape[-1] if array.ndim else 1
        if array.size == 0:
            return b""
        rows = np.asarray(array, dtype=np.float64).reshape(-1, width)
        keys = np.where(np.isnan(rows), np.inf, -rows)
        order = np.argsort(keys, axis=1, kind="stable")[:, : min(self.k, width)]  # ties: index
        return order.astype(">u4").tobytes()

    def _quantize(self, array: np.ndarray[Any, Any]) -> bytes:
        import numpy as np

        values = np.asarray(array, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = np.rint(values / self.step)
        clamped = np.clip(np.nan_to_num(scaled, nan=0.0), _INT32_MIN + 1, _INT32_MAX)
        return np.where(np.isnan(values), _INT32_MIN, clamped).astype(">i4").tobytes()


def _topk_small(flat: list[float], shape: tuple[int, ...], k: int) -> bytes:
    """:meth:`CanonicalRule._topk` in plain Python (~10x faster on a classifier's row)."""
    width = shape[-1] if shape else 1
    if not flat:
        return b""
    k = min(k, width)
    out: list[int] = []
    for start in range(0, len(flat), width):
        row = flat[start : start + width]
        # largest first, equal values by lowest index, NaN ranked with -inf
        ranked = sorted((-x if x == x else math.inf, i) for i, x in enumerate(row))
        out.extend(i for _, i in ranked[:k])
    return struct.pack(f">{len(out)}I", *out)


def _quantize_small(flat: list[float], step: float) -> bytes:
    """:meth:`CanonicalRule._quantize` in plain Python (``round`` is half to even too)."""
    out = []
    for x in flat:
        if x != x:
            out.append(_INT32_MIN)
            continue
        scaled = x / step
        q = (
            _INT32_MAX
            if scaled > _INT32_MAX
            else _INT32_MIN + 1
            if scaled < _INT32_MIN
            else round(scaled)
        )
        out.append(min(max(q, _INT32_MIN + 1), _INT32_MAX))
    return struct.pack(f">{len(out)}i", *out)


DEFAULT_CANONICAL = CanonicalRule("topk", k=1)
"""The rule of a package whose manifest has no ``"canonical"`` key (and of zoo models served
without a package): the top-1 index of each row of each output tensor."""


def canonical_bytes(rule: CanonicalRule, payload: bytes, *, max_bytes: int = 64 << 20) -> bytes:
    """``rule`` applied to the decoded ``payload`` (CodecError if it does not decode).

    A small float32/float64 payload of the ``float32`` codec (a classifier's logits: the
    edge's hot path) is read here with ``struct``; anything else goes through
    ``decode_features``. Both give the same bytes."""
    small = _small_raw(payload, max_bytes)
    if small is not None:
        return rule._encode(small)
    from secure_ci.partition._codec import decode_features  # torch: only when needed

    tensors = decode_features(payload, max_bytes=max_bytes)
    return rule.encode([t.numpy() for t in tensors])


_MAGIC = b"SCIF\x01\x00"  # feature bytes, format version 1, codec float32 (raw, no stage)
_RAW = {1: "f", 4: "d"}  # the codec's dtype codes of float32 and float64
_DESC = struct.Struct("<BBB")


def _small_raw(payload: bytes, max_bytes: int) -> list[tuple[tuple[int, ...], list[float]]] | None:
    """The tensors of a well-formed raw float payload of at most :data:`_SMALL` values per
    tensor, else None (the codec's decoder then decides, errors included)."""
    if len(payload) > min(max_bytes, 1 << 16) or payload[:6] != _MAGIC or len(payload) < 7:
        return None
    count, offset = payload[6], 7
    heads = []
    for _ in range(count):
        if len(payload) < offset + 3:
            return None
        code, flags, ndim = _DESC.unpack_from(payload, offset)
        offset += 3
        if code not in _RAW or flags or ndim > 8 or len(payload) < offset + 4 * ndim:
            return None
        shape = struct.unpack_from(f"<{ndim}I", payload, offset)
        offset += 4 * ndim
        heads.append((code, shape))
    tensors = []
    for code, shape in heads:
        n = math.prod(shape)
        size = 4 if code == 1 else 8
        if n > _SMALL or len(payload) < offset + n * size:
            return None
        tensors.append((shape, list(struct.unpack_from(f"<{n}{_RAW[code]}", payload, offset))))
        offset += n * size
    return tensors if offset == len(payload) else None


DEFAULT_QUANTIZE_STEP = 2.0**-6
"""The step :func:`default_canonical` picks for outputs that are not a classifier's."""


def default_canonical(output_shapes: Sequence[Sequence[int]]) -> CanonicalRule:
    """The rule packing picks for a model whose (one-sample) outputs have these shapes: the
    top-1 label for a classifier (one output of shape ``[1, classes]``, classes >= 2),
    otherwise values quantized to :data:`DEFAULT_QUANTIZE_STEP`."""
    if len(output_shapes) == 1 and len(output_shapes[0]) == 2:
        batch, classes = output_shapes[0]
        if batch == 1 and classes >= 2:
            return DEFAULT_CANONICAL
    return CanonicalRule("quantize", step=DEFAULT_QUANTIZE_STEP)


def parse_canonical(text: str) -> CanonicalRule:
    """A rule from the command line: ``topk:K`` or ``quantize:STEP`` (PackageError if not)."""
    kind, _, value = text.partition(":")
    try:
        if kind == "topk":
            return CanonicalRule("topk", k=int(value))
        if kind == "quantize":
            return CanonicalRule("quantize", step=float(value))
    except ValueError:
        pass
    raise PackageError(f"canonical rule must be topk:K or quantize:STEP, got {text[:40]!r}")
