"""Registered tails: which (model, cut) this edge serves, and running a batch of them.

A tail is loaded once at start and then only read. Incoming features are decoded with the
registered boundary specs as ``expected`` (shape and dtype checked from the codec header,
before any tensor is allocated), so a wrong tensor never reaches torch; the codec the request
names must be the one in the payload's header. Each request carries one sample (size 1 along
each boundary tensor's batch dimension, which is not always the first). A batched tail
concatenates samples along those dimensions, runs once, and splits each output along its own
batch dimension; a tail whose boundary or outputs have no batch dimension (or that does not
batch faithfully, found by a probe run at load) is served unbatched, one request per call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from secure_ci.edge._config import ModelSpec
from secure_ci.exceptions import CodecError, ConfigError, ProtocolError
from secure_ci.partition import Partitioner
from secure_ci.partition._canonical import DEFAULT_CANONICAL, CanonicalRule
from secure_ci.partition._codec import CODECS, decode_features, encode_features
from secure_ci.partition._guard import running
from secure_ci.partition._plan import TensorSpec
from secure_ci.plan import EDGE_ONLY_CUT
from secure_ci.protocol._codes import ErrorCode

__all__ = [
    "ModelRegistry",
    "TailEntry",
    "load_model_tails",
    "load_zoo_tails",
    "payload_codec",
    "probe_batching",
    "tails_from_partitioner",
]

Features = tuple[torch.Tensor, ...]

PROBE_RTOL = 1e-4
PROBE_ATOL = 1e-5
"""How closely a batched probe run must reproduce per-sample runs for a tail to be batched."""


@functools.cache
def _codec_ids() -> dict[bytes, str]:
    """Feature header bytes that name a codec (magic and codec id; the format version byte
    between them is left to the decoder) -> codec name, learnt from the encoder itself."""
    table = {}
    for name in CODECS:
        header = encode_features([], name)
        table[header[:4] + header[5:6]] = name
    if len(table) != len(CODECS):  # pragma: no cover - the codec header format changed
        raise ConfigError("feature headers no longer name their codec at byte 5")
    return table


def payload_codec(payload: bytes) -> str:
    """The codec named in a feature payload's header; CodecError if it names none."""
    name = _codec_ids().get(bytes(payload[:4]) + bytes(payload[5:6]))
    if name is None:
        raise CodecError("the payload's header names no known codec")
    return name


@dataclass(frozen=True)
class TailEntry:
    """One servable (model, cut): the tail module and what it accepts.

    ``output_batch_dims`` gives, for each output tensor (flattened in order), the dimension
    along which a batch splits back into samples; None serves the tail unbatched. Build
    entries with :meth:`build`, which probes whether (and how) the tail batches.
    """

    model_id: bytes
    cut: int
    tail: torch.nn.Module = field(repr=False, compare=False)
    inputs: tuple[TensorSpec, ...]
    codecs: frozenset[str]
    output_codec: str = "float32"
    output_batch_dims: tuple[int, ...] | None = None
    canonical: CanonicalRule = DEFAULT_CANONICAL
    """The model's canonical output rule (from its package), which result commitments open."""

    def __post_init__(self) -> None:
        if len(self.model_id) != 32 or not 0 <= self.cut < 1 << 16:
            raise ConfigError("a tail needs a 32-byte model id and a uint16 cut")
        if not self.inputs or any(
            s.batch_dim is not None and s.shape[s.batch_dim] != 1 for s in self.inputs
        ):
            raise ConfigError("tail inputs must be per-sample specs (size 1 along the batch)")
        if self.output_batch_dims is not None and any(s.batch_dim is None for s in self.inputs):
            raise ConfigError("a batched tail needs a batch dimension in every input")
        unknown = (set(self.codecs) | {self.output_codec}) - set(CODECS)
        if unknown or not self.codecs:
            raise ConfigError(f"unknown codecs {sorted(unknown)}; known: {', '.join(CODECS)}")

    @classmethod
    def build(
        cls,
        model_id: bytes,
        cut: int,
        tail: torch.nn.Module,
        inputs: tuple[TensorSpec, ...],
        codecs: frozenset[str],
        output_codec: str = "float32",
        canonical: CanonicalRule = DEFAULT_CANONICAL,
    ) -> TailEntry:
        """An entry that is batched when :func:`probe_batching` says the tail batches."""
        tail.eval()
        return cls(
            model_id, cut, tail, inputs, codecs, output_codec, probe_batching(tail, inputs),
            canonical,
        )  # fmt: skip

    @property
    def batchable(self) -> bool:
        """Whether requests can share one tail call."""
        return self.output_batch_dims is not None

    @property
    def max_feature_bytes(self) -> int:
        """Upper bound of decoded feature bytes for one request (float64-safe margin)."""
        return sum(8 * s.numel for s in self.inputs) + 4096

    def decode(self, codec: str, payload: bytes) -> Features:
        """Decode one request's features; anything unexpected is ``BAD_TENSOR``."""
        if codec not in self.codecs:
            raise ProtocolError(f"codec {codec!r} is not served", code=ErrorCode.BAD_TENSOR)
        try:
            if payload_codec(payload) != codec:
                raise CodecError(f"the payload is not encoded with {codec!r}")
            return decode_features(payload, max_bytes=self.max_feature_bytes, expected=self.inputs)
        except CodecError as exc:
            raise ProtocolError(f"bad features: {exc}", code=ErrorCode.BAD_TENSOR) from None

    def run_batch(self, batch: Sequence[Features]) -> list[bytes]:
        """Run the tail once over ``batch`` and return each request's encoded output."""
        if len(batch) == 1:  # no copies: the sample is the batch
            with running(), torch.inference_mode():
                return [encode_features(_flatten(self.tail(*batch[0])), self.output_codec)]
        if self.output_batch_dims is None:
            raise ProtocolError("this tail runs one request at a time", code=ErrorCode.INTERNAL)
        columns = [
            torch.cat(parts, dim=_dim(spec))
            for parts, spec in zip(zip(*batch, strict=True), self.inputs, strict=True)
        ]
        with running(), torch.inference_mode():
            outputs = _flatten(self.tail(*columns))
        dims, codec = self.output_batch_dims, self.output_codec
        if len(outputs) != len(dims):
            raise ProtocolError("the tail's outputs changed", code=ErrorCode.INTERNAL)
        return [
            encode_features([_sample(o, d, i) for o, d in zip(outputs, dims, strict=True)], codec)
            for i in range(len(batch))
        ]


def _sample(output: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    """Sample ``index`` of a batched output (contiguous: the codec reads memory in order)."""
    part = output.narrow(dim, index, 1)
    return part if dim == 0 else part.contiguous()


def _dim(spec: TensorSpec) -> int:
    if spec.batch_dim is None:  # pragma: no cover - refused by TailEntry
        raise ProtocolError("input without a batch dimension", code=ErrorCode.INTERNAL)
    return spec.batch_dim


def _example(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(spec.shape, generator=generator).to(dtype)
    return torch.zeros(spec.shape, dtype=dtype)


def probe_batching(tail: torch.nn.Module, inputs: Sequence[TensorSpec]) -> tuple[int, ...] | None:
    """The batch dimension of each output of ``tail``, or None if it cannot be batched.

    Two random samples run one by one and then batched along the inputs' batch dimensions;
    the tail batches when every output grows along exactly one dimension and the batched run
    reproduces each sample's output (a tail that mixes samples is served unbatched).
    """
    if not inputs or any(s.batch_dim is None for s in inputs):
        return None
    generator = torch.Generator().manual_seed(0)
    samples = [tuple(_example(s, generator) for s in inputs) for _ in range(2)]
    try:
        with running(), torch.inference_mode():
            alone = [_flatten(tail(*sample)) for sample in samples]
            joined = _flatten(
                tail(
                    *(
                        torch.cat(parts, dim=_dim(spec))
                        for parts, spec in zip(zip(*samples, strict=True), inputs, strict=True)
                    )
                )
            )
    except Exception:  # a tail that fails batched is served unbatched
        return None
    dims = []
    for k, out in enumerate(joined):
        one = alone[0][k]
        grown = [
            d for d in range(out.dim()) if out.dim() == one.dim() and out.shape[d] != one.shape[d]
        ]
        if len(grown) != 1 or out.shape[grown[0]] != 2 or one.shape[grown[0]] != 1:
            return None
        d = grown[0]
        for i, single in enumerate(alone):
            part = out.narrow(d, i, 1)
            if part.dtype != single[k].dtype or not torch.allclose(
                part, single[k], rtol=PROBE_RTOL, atol=PROBE_ATOL, equal_nan=True
            ):
                return None
        dims.append(d)
    return tuple(dims)


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
    partitioner: Partitioner,
    cuts: Sequence[int],
    codecs: Sequence[str],
    canonical: CanonicalRule = DEFAULT_CANONICAL,
) -> list[TailEntry]:
    """Split at each cut; the boundary specs come from the partitioner's analysis."""
    model_id = bytes.fromhex(partitioner.model_id)
    tails = []
    for cut in cuts:
        _, tail = partitioner.split(cut)
        specs = tuple(partitioner.cut(cut).boundary)
        tails.append(
            TailEntry.build(model_id, cut, tail, specs, frozenset(codecs), canonical=canonical)
        )
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


def load_model_tails(spec: ModelSpec) -> list[TailEntry]:
    """The tails of one ``[[models]]`` entry: a zoo model, or a verified model package.

    A package without cuts serves its batchable cuts (every boundary tensor has a batch
    dimension); a listed cut the package does not have is a :class:`ConfigError`, and a
    package that fails verification raises :class:`PackageError`. A package's whole model
    is served too, as cut :data:`~secure_ci.plan.EDGE_ONLY_CUT` (a device's edge-only
    mode): every tail stays resident, so a device switching cut or codec per task costs the
    edge nothing.
    """
    if spec.package is None:
        if spec.zoo is None:  # pragma: no cover - ModelSpec requires one of the two
            raise ConfigError("a model needs a zoo name or a package")
        return load_zoo_tails(spec.zoo, spec.cuts, spec.codecs, spec.seed)
    from secure_ci.package import load_package

    package = load_package(spec.package)
    cuts = spec.cuts or package.batchable_cuts
    if not cuts:
        raise ConfigError(f"model package {spec.package}: no batchable cut, list the cuts")
    for cut in cuts:
        if cut >= len(package.cuts):
            raise ConfigError(
                f"model package {spec.package} has {len(package.cuts)} cuts, not cut {cut}"
            )
    partitioner = package.partitioner()
    whole = TailEntry.build(
        package.model_id, EDGE_ONLY_CUT, partitioner.model, partitioner.input_specs,
        frozenset(spec.codecs), canonical=package.canonical,
    )  # fmt: skip
    return [*tails_from_partitioner(partitioner, cuts, spec.codecs, package.canonical), whole]
