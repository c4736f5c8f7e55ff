"""The cost model: what one task costs under one configuration, from plain numbers.

A configuration is (edge, cut, codec, exit). Device-only and edge-only are ordinary
configurations: cut :data:`DEVICE_ONLY_CUT` (no edge, no codec) and :data:`EDGE_ONLY_CUT`
(the input itself crosses the link; the same value the wire protocol uses). The predicted
latency of a task is::

    exit path  = d * (head[exit cut] + exit head)
    full path  = d * (head[cut] + exit head + encode)
                 + intercept + bytes * ms_per_byte + queue + e * (tail[cut] + decode)
    expected   = p_exit * exit path + (1 - p_exit) * full path

with ``d`` the device speed factor and ``e`` the edge's. The exit head decides before the
device encodes, so a confident exit never pays for encoding. Device-only has no network or
edge terms (its full path is ``d * (full model + exit head)``). The accuracy drop of a
configuration is the exit's calibrated drop plus the codec's drop at the cut (additive: the
two are calibrated separately on held-out data, and the sum is a conservative estimate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from secure_ci.exceptions import ConfigError
from secure_ci.partition import ExitPolicy, Profile

__all__ = [
    "DEVICE_ONLY_CUT",
    "EDGE_ONLY_CUT",
    "Configuration",
    "CostBreakdown",
    "EdgeEstimate",
    "ExitCalibration",
    "ModelCosts",
    "predict",
]

EDGE_ONLY_CUT = 0xFFFF
DEVICE_ONLY_CUT = -1
_MB = 1e6
# Nominal boundary size per codec relative to float32 (per-channel scales left out).
DEFAULT_BYTE_RATIO = {"float32": 1.0, "float16": 0.5, "int8": 0.25, "int4": 0.125}
# Nominal (encode, decode) milliseconds per MB of float32 boundary.
DEFAULT_CODEC_MS_PER_MB = {
    "float32": (0.0, 0.0),
    "float16": (0.3, 0.3),
    "int8": (0.5, 0.4),
    "int4": (0.8, 0.6),
}
Mode = Literal["device", "edge", "split"]


def _finite(value: float, what: str, *, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if not 0.0 <= value <= upper or math.isnan(value):
        raise ConfigError(f"{what} must be in [0, {upper}], got {value}")
    return float(value)


@dataclass(frozen=True)
class ExitCalibration:
    """An exit policy with its calibration: exit rate, accuracy drop (points), exit head ms."""

    policy: ExitPolicy
    p_exit: float
    accuracy_drop: float
    head_ms: float

    def __post_init__(self) -> None:
        if not isinstance(self.policy, ExitPolicy):
            raise ConfigError("an exit calibration needs an ExitPolicy")
        object.__setattr__(self, "p_exit", _finite(self.p_exit, "p_exit", upper=1.0))
        object.__setattr__(self, "accuracy_drop", _finite(self.accuracy_drop, "exit drop"))
        object.__setattr__(self, "head_ms", _finite(self.head_ms, "exit head_ms"))
        if math.isinf(self.head_ms):
            raise ConfigError("exit head_ms must be finite")

    def __str__(self) -> str:
        op = ">=" if self.policy.metric == "max_softmax" else "<="
        return f"exit@{self.policy.cut} {self.policy.metric}{op}{self.policy.threshold:g}"


@dataclass(frozen=True)
class Configuration:
    """Where one task runs: ``edge`` and ``codec`` are None for device-only."""

    edge: str | None
    cut: int
    codec: str | None
    exit: ExitCalibration | None = None

    def __post_init__(self) -> None:
        local = self.cut == DEVICE_ONLY_CUT
        if local != (self.edge is None) or local != (self.codec is None):
            raise ConfigError("device-only has neither edge nor codec; every other cut has both")
        if self.exit is not None:
            if self.cut == EDGE_ONLY_CUT:
                raise ConfigError("edge-only runs nothing on the device: no exit")
            if not local and self.exit.policy.cut > self.cut:
                raise ConfigError(f"exit cut {self.exit.policy.cut} beyond split cut {self.cut}")

    @property
    def mode(self) -> Mode:
        if self.cut == DEVICE_ONLY_CUT:
            return "device"
        return "edge" if self.cut == EDGE_ONLY_CUT else "split"

    def __str__(self) -> str:
        if self.mode == "device":
            where = "device-only"
        elif self.mode == "edge":
            where = f"{self.edge} edge-only {self.codec}"
        else:
            where = f"{self.edge} cut {self.cut} {self.codec}"
        return where if self.exit is None else f"{where} {self.exit}"


def _table(rows: object, n: int, m: int, what: str) -> tuple[tuple[float, ...], ...]:
    if not isinstance(rows, Sequence) or len(rows) != n:
        raise ConfigError(f"{what} needs one row per cut ({n})")
    out = []
    for row in rows:
        if not isinstance(row, Sequence) or len(row) != m:
            raise ConfigError(f"{what} needs one value per codec ({m}) in every row")
        out.append(tuple(_finite(v, what) for v in row))
    return tuple(out)


@dataclass(frozen=True)
class ModelCosts:
    """Profiled costs of one model: per cut (device head, edge tail) and per (cut, codec).

    ``cuts`` are the model's cut indices, optionally with :data:`EDGE_ONLY_CUT` (head 0,
    tail = the whole model on the edge, bytes = the input). Times are profiled milliseconds
    (device ones on the device, edge ones on the edge); ``accuracy_drop`` is in points, and
    ``inf`` marks a (cut, codec) that was never calibrated and so is never chosen under a
    finite budget.
    """

    cuts: tuple[int, ...]
    codecs: tuple[str, ...]
    head_ms: tuple[float, ...]
    tail_ms: tuple[float, ...]
    device_full_ms: float
    nbytes: tuple[tuple[float, ...], ...]
    encode_ms: tuple[tuple[float, ...], ...]
    decode_ms: tuple[tuple[float, ...], ...]
    accuracy_drop: tuple[tuple[float, ...], ...]
    exits: tuple[ExitCalibration, ...] = field(default=())

    def __post_init__(self) -> None:
        n, m = len(self.cuts), len(self.codecs)
        if n == 0 or m == 0 or len(set(self.cuts)) != n or len(set(self.codecs)) != m:
            raise ConfigError("model costs need distinct cuts and distinct codecs")
        for cut in self.cuts:
            if isinstance(cut, bool) or not isinstance(cut, int) or cut < 0:
                raise ConfigError(f"cut {cut!r} must be a non-negative integer")
        for name in ("head_ms", "tail_ms"):
            values = getattr(self, name)
            if not isinstance(values, Sequence) or len(values) != n:
                raise ConfigError(f"{name} needs one value per cut ({n})")
            object.__setattr__(self, name, tuple(_finite(v, name) for v in values))
        object.__setattr__(self, "device_full_ms", _finite(self.device_full_ms, "full_ms"))
        for name in ("nbytes", "encode_ms", "decode_ms", "accuracy_drop"):
            object.__setattr__(self, name, _table(getattr(self, name), n, m, name))
        flat = [*self.head_ms, *self.tail_ms, self.device_full_ms]
        for name in ("nbytes", "encode_ms", "decode_ms"):
            flat.extend(v for row in getattr(self, name) for v in row)
        if not all(math.isfinite(v) for v in flat):
            raise ConfigError("model cost times and bytes must be finite")
        model_cuts = set(self.cuts) - {EDGE_ONLY_CUT}
        for ex in self.exits:
            if not isinstance(ex, ExitCalibration) or ex.policy.cut not in model_cuts:
                raise ConfigError(f"exit {ex!r:.80} is not at one of the model's cuts")
        object.__setattr__(self, "exits", tuple(self.exits))

    def position(self, cut: int) -> int:
        """Row of ``cut`` in the per-cut tables."""
        try:
            return self.cuts.index(cut)
        except ValueError:
            raise ConfigError(f"cut {cut} is not in the model's costs") from None

    @classmethod
    def from_profiles(
        cls,
        device: Profile,
        edge: Profile,
        *,
        input_bytes: int | None = None,
        codecs: Sequence[str] = ("float32", "float16", "int8", "int4"),
        byte_ratio: Mapping[str, float] = DEFAULT_BYTE_RATIO,
        codec_ms_per_mb: Mapping[str, tuple[float, float]] = DEFAULT_CODEC_MS_PER_MB,
        accuracy_drop: Mapping[tuple[int, str], float | None] | None = None,
        nbytes: Mapping[tuple[int, str], float] | None = None,
        exits: Sequence[ExitCalibration] = (),
    ) -> ModelCosts:
        """Costs from a device profile and an edge profile of the same model.

        ``byte_ratio`` and ``codec_ms_per_mb`` are looked up by the full codec name, then by
        its base (``int8`` for ``int8+zstd``); ``nbytes`` overrides the bytes of a (cut, codec)
        with a measured size (a package's codec rows). ``accuracy_drop`` maps (cut, codec) to
        points; float32 codecs default to 0 and any other missing (or None) entry to ``inf``
        (not calibrated). ``input_bytes`` (float32) adds the edge-only configuration.
        """
        if device.model_id != edge.model_id or [c.name for c in device.cuts] != [
            c.name for c in edge.cuts
        ]:
            raise ConfigError("device and edge profiles are of different models")
        drops = dict(accuracy_drop or {})
        measured = dict(nbytes or {})
        cuts = [c.index for c in device.cuts]
        sizes = [float(c.nbytes) for c in device.cuts]
        head = [c.head_ms for c in device.cuts]
        tail = [c.tail_ms for c in edge.cuts]
        if input_bytes is not None:
            cuts.insert(0, EDGE_ONLY_CUT)
            sizes.insert(0, float(_finite(input_bytes, "input_bytes")))
            head.insert(0, 0.0)
            tail.insert(0, edge.full_ms)

        def lookup(table: Mapping[str, Any], codec: str) -> Any:
            for key in (codec, codec.partition("+")[0]):
                if key in table:
                    return table[key]
            raise ConfigError(f"no byte ratio / codec speed for codec {codec!r}")

        def drop(cut: int, codec: str) -> float:
            value = drops.get((cut, codec))
            if value is not None:
                return value
            return 0.0 if codec.partition("+")[0] == "float32" else math.inf

        def size(cut: int, plain: float, codec: str) -> float:
            return measured.get((cut, codec), plain * float(lookup(byte_ratio, codec)))

        return cls(
            cuts=tuple(cuts),
            codecs=tuple(codecs),
            head_ms=tuple(head),
            tail_ms=tuple(tail),
            device_full_ms=device.full_ms,
            nbytes=tuple(
                tuple(size(cut, s, c) for c in codecs) for cut, s in zip(cuts, sizes, strict=True)
            ),
            encode_ms=tuple(
                tuple(s / _MB * lookup(codec_ms_per_mb, c)[0] for c in codecs) for s in sizes
            ),
            decode_ms=tuple(
                tuple(s / _MB * lookup(codec_ms_per_mb, c)[1] for c in codecs) for s in sizes
            ),
            accuracy_drop=tuple(tuple(drop(cut, c) for c in codecs) for cut in cuts),
            exits=tuple(exits),
        )


@dataclass(frozen=True)
class EdgeEstimate:
    """What the device currently believes about one edge (a snapshot of its estimators).

    The network time of ``b`` bytes is ``intercept_ms + b * ms_per_byte`` with predictive
    variance ``var_coeffs[0] + var_coeffs[1] * b + var_coeffs[2] * b**2`` (ms²).
    ``link_steps`` counts the link's detected steps: when it moves, the planner knows the
    link changed (not noise) and takes a gain without waiting out its patience.
    """

    intercept_ms: float
    ms_per_byte: float
    queue_ms: float = 0.0
    speed_factor: float = 1.0
    var_coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    queue_var: float = 0.0
    link_steps: int = 0
    """How many steps the link's detector has seen (the planner notices when it moves)."""

    def __post_init__(self) -> None:
        steps = self.link_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"link_steps must be an integer >= 0, got {steps!r}")
        for name in ("intercept_ms", "ms_per_byte", "queue_ms", "speed_factor", "queue_var"):
            value = _finite(getattr(self, name), name)
            if math.isinf(value):
                raise ConfigError(f"{name} must be finite")
            object.__setattr__(self, name, value)
        if len(self.var_coeffs) != 3 or not all(math.isfinite(c) for c in self.var_coeffs):
            raise ConfigError("var_coeffs must be three finite numbers")

    def network_ms(self, nbytes: float) -> float:
        return self.intercept_ms + nbytes * self.ms_per_byte

    def network_var(self, nbytes: float) -> float:
        c0, c1, c2 = self.var_coeffs
        return max(0.0, c0 + c1 * nbytes + c2 * nbytes * nbytes)


@dataclass(frozen=True)
class CostBreakdown:
    """The predicted cost of one configuration, by component (milliseconds)."""

    configuration: Configuration
    device_ms: float
    p_exit: float
    exit_path_ms: float
    nbytes: float
    network_ms: float
    queue_ms: float
    edge_ms: float
    full_path_ms: float
    expected_ms: float
    std_ms: float
    accuracy_drop: float

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"configuration": str(self.configuration)}
        for name in self.__dataclass_fields__:
            if name != "configuration":
                out[name] = getattr(self, name)
        return out


def predict(
    costs: ModelCosts,
    configuration: Configuration,
    edge: EdgeEstimate | None,
    *,
    device_speed: float = 1.0,
) -> CostBreakdown:
    """Predict one configuration, one scalar at a time (the planner's reference)."""
    ex = configuration.exit
    p = ex.p_exit if ex is not None else 0.0
    exit_head = ex.head_ms if ex is not None else 0.0
    exit_at = costs.head_ms[costs.position(ex.policy.cut)] if ex is not None else 0.0
    exit_path = device_speed * (exit_at + exit_head) if ex is not None else 0.0
    drop = ex.accuracy_drop if ex is not None else 0.0
    if configuration.mode == "device":
        device = device_speed * (costs.device_full_ms + exit_head)
        return CostBreakdown(
            configuration, device, p, exit_path, 0.0, 0.0, 0.0, 0.0, device,
            p * exit_path + (1 - p) * device, 0.0, drop,
        )  # fmt: skip
    if edge is None or configuration.codec is None:
        raise ConfigError(f"{configuration} needs an estimate of its edge")
    i = costs.position(configuration.cut)
    j = costs.codecs.index(configuration.codec)
    device = device_speed * (costs.head_ms[i] + exit_head + costs.encode_ms[i][j])
    nbytes = costs.nbytes[i][j]
    network = edge.network_ms(nbytes)
    remote = edge.speed_factor * (costs.tail_ms[i] + costs.decode_ms[i][j])
    full = device + network + edge.queue_ms + remote
    std = math.sqrt(edge.network_var(nbytes) + edge.queue_var)
    return CostBreakdown(
        configuration, device, p, exit_path, nbytes, network, edge.queue_ms, remote, full,
        p * exit_path + (1 - p) * full, std, drop + costs.accuracy_drop[i][j],
    )  # fmt: skip
