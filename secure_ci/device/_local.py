"""The device's own copy of a model package: heads, local tails and the planner's costs.

A device that plans per task needs every side of every cut it may choose: the head at each
cut (to send features), the tail at each cut (to finish a task locally when no edge answers,
from the features it already computed: the head is never run twice), and the whole model
(device-only). Splits are made once, on first use, from the package's verified partitioner.
All of it is blocking torch work: call it from a worker thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secure_ci.exceptions import ConfigError, PartitionError
from secure_ci.package import ModelPackage
from secure_ci.partition import ExitPolicy, should_exit
from secure_ci.partition._codec import decode_features, encode_features
from secure_ci.partition._guard import running
from secure_ci.partition._stage import check_inputs
from secure_ci.plan import EDGE_ONLY_CUT, ModelCosts

__all__ = ["LocalModel", "Start"]

Tensors = tuple[torch.Tensor, ...]


class LocalModel:
    """Heads, tails and costs of one package's model (split lazily, cached)."""

    def __init__(
        self, package: ModelPackage, *, cuts: Sequence[int] | None = None, exits: bool = True
    ) -> None:
        self.package = package
        self.model_id = package.model_id
        self._partitioner = package.partitioner()
        known = {c.index for c in package.cuts}
        chosen = tuple(package.batchable_cuts if cuts is None else cuts)
        unknown = [c for c in chosen if c not in known]
        if unknown or not chosen:
            raise ConfigError(f"cuts {unknown or list(chosen)} are not cuts of the package")
        self.cuts = chosen
        self.exits = tuple(e for e in package.exits if e.policy.cut in chosen) if exits else ()
        """The package's calibrated exit policies at the planned cuts."""
        self._heads: dict[int, nn.Module] = {}
        self._tails: dict[int, nn.Module] = {}
        self._exit_heads: dict[int, nn.Module] = {}

    @property
    def full(self) -> nn.Module:
        return self._partitioner.model

    def head(self, cut: int) -> nn.Module:
        if cut not in self._heads:
            self._heads[cut], self._tails[cut] = self._partitioner.split(cut)
        return self._heads[cut]

    def tail(self, cut: int) -> nn.Module:
        if cut == EDGE_ONLY_CUT:
            return self.full
        self.head(cut)
        return self._tails[cut]

    def encode(self, inputs: Tensors, cut: int, codec: str) -> tuple[bytes, float]:
        """Run the head at ``cut`` (nothing for edge-only) and encode its boundary; the
        payload and the head's milliseconds (encoding excluded)."""
        start = time.perf_counter()
        if cut == EDGE_ONLY_CUT:
            boundary: Any = inputs
        else:
            with running(), torch.inference_mode():
                boundary = self.head(cut)(*inputs)
        head_ms = (time.perf_counter() - start) * 1e3
        tensors = boundary if isinstance(boundary, tuple) else (boundary,)
        return encode_features(tensors, codec), head_ms

    def start(
        self, inputs: Tensors, cut: int, codec: str | None, policy: ExitPolicy | None
    ) -> Start:
        """A task's device side under one configuration: with an exit ``policy``, the head
        at its cut and the exit head first (a confident exit is the task's output); then,
        for device-only (``codec`` None), the rest of the model, else the encoded boundary
        at ``cut``. Times in milliseconds, for the speed estimate."""
        self.check(inputs)
        started = time.perf_counter()
        boundary: Tensors | None = None
        if policy is not None:
            with running(), torch.inference_mode():
                boundary = _tuple(self.head(policy.cut)(*inputs))
                logits = self._exit_head(policy.cut)(*boundary)
            if bool(should_exit(logits, policy).all()):
                return Start((logits,), None, _ms(started), exited=True)
        if codec is None:
            # the whole model, or its rest from the exit's boundary
            rest = self.full if boundary is None or policy is None else self.tail(policy.cut)
            with running(), torch.inference_mode():
                out = rest(*(inputs if boundary is None else boundary))
            return Start(_tuple(out), None, _ms(started))
        if boundary is None or policy is None or policy.cut != cut:
            payload, _ = self.encode(inputs, cut, codec)
        else:
            payload = encode_features(boundary, codec)
        return Start(None, payload, _ms(started))

    def check(self, inputs: Tensors) -> None:
        """PartitionError unless ``inputs`` are one sample of what the model takes."""
        specs = self._partitioner.input_specs
        one: tuple[frozenset[int], ...] = tuple(frozenset() for _ in specs)  # batch of 1
        check_inputs(inputs, specs, one, "the model")

    def _exit_head(self, cut: int) -> nn.Module:
        if cut not in self._exit_heads:
            self._exit_heads[cut] = self.package.exit_head(cut)
        return self._exit_heads[cut]

    def finish(self, cut: int, payload: bytes) -> Tensors:
        """The tail at ``cut``, run here on features this device encoded."""
        with running(), torch.inference_mode():
            out = self.tail(cut)(*decode_features(payload))
        return out if isinstance(out, tuple) else (out,)

    def run(self, inputs: Tensors) -> Tensors:
        """The whole model on the device."""
        self.check(inputs)
        with running(), torch.inference_mode():
            out = self.full(*inputs)
        return out if isinstance(out, tuple) else (out,)

    def costs(self, codecs: Sequence[str], *, edge_only: bool = True) -> ModelCosts:
        """The planner's costs from the package's profile and codec table (the device and
        the edge both start from the packing machine's profile; live estimates correct it)."""
        if not self.package.profiles:
            raise ConfigError("the model package has no latency profile: pack it with one")
        profile = self.package.profiles[0]
        wanted = set(self.cuts)
        profile = dataclasses.replace(
            profile, cuts=tuple(c for c in profile.cuts if c.index in wanted)
        )
        if len(profile.cuts) != len(wanted):
            raise PartitionError("the package's profile lacks some of the planned cuts")
        rows = {(r.cut, r.codec): r for r in self.package.codecs}
        input_bytes = 4 * _numel(self.package.input_shape)
        return ModelCosts.from_profiles(
            profile,
            profile,
            input_bytes=input_bytes if edge_only else None,
            codecs=tuple(codecs),
            accuracy_drop={key: row.accuracy_drop_pt for key, row in rows.items()},
            nbytes={key: row.nbytes for key, row in rows.items()},
            exits=self.exits,
        )


@dataclass(frozen=True)
class Start:
    """What the device side of a task produced: the output (``exited`` early, or the whole
    model ran here), or the payload for an edge; and its milliseconds."""

    output: Tensors | None
    payload: bytes | None
    ms: float
    exited: bool = False


def _tuple(value: Any) -> Tensors:
    return value if isinstance(value, tuple) else (value,)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
