"""The plan benchmark's rig: real models, a real in-process edge, real sessions, a shaped link.

A :class:`ModelRig` is one zoo model with its calibration, measured once at start on this
machine (what a model package's profile and codec calibration hold): per cut the head and
tail latency (``secure_ci.partition.profile``), per (cut, codec) the payload bytes and the
encode and decode time of the real boundary. :class:`Device` runs one task of any
configuration for real: the head (and the encoder) on the device, slowed down by sleeping
``(slowdown - 1)`` times their measured time right after running them, then the features
over a pre-opened attested session (one per (cut, codec)) through the link shaper to the
edge. Edge tails are wrapped to time their forward pass (what the edge reports as compute
time in protocol 3, which ``Session`` does not hand out yet).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from secure_ci.device import DeviceIdentity, Session, open_session
from secure_ci.edge import (
    EdgeConfig,
    EdgeLimits,
    ModelRegistry,
    TailEntry,
    open_edge,
    tails_from_partitioner,
)
from secure_ci.exceptions import SecureCIError
from secure_ci.partition import Partitioner, PartitionPlan, TensorSpec, profile
from secure_ci.partition._codec import decode_features, encode_features
from secure_ci.plan import DEVICE_ONLY_CUT, EDGE_ONLY_CUT, Configuration, ModelCosts
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave

CODECS = ("float32", "float16", "int8", "int4")
EDGE = "edge"


class _InputHead(nn.Module):
    """Edge-only: the device's head is nothing, the input itself is the boundary."""

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return xs


class _Timed(nn.Module):
    """A tail that records how long each forward pass took (ms)."""

    def __init__(self, inner: nn.Module, sink: list[float]) -> None:
        super().__init__()
        self.inner = inner
        self.sink = sink

    def forward(self, *xs: torch.Tensor) -> Any:
        start = time.perf_counter()
        out = self.inner(*xs)
        self.sink.append((time.perf_counter() - start) * 1e3)
        return out


def _median_ms(fn: Any, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@dataclass
class ModelRig:
    """One model, its calibrated costs, and what device and edge need to run it."""

    name: str
    partitioner: Partitioner
    cuts: tuple[int, ...]
    costs: ModelCosts
    heads: dict[int, nn.Module]
    tails: list[TailEntry]
    inputs: list[torch.Tensor]
    compute_ms: list[float] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return self.partitioner.model_id


def build_rig(name: str, *, cut_count: int, repeats: int, samples: int = 16) -> ModelRig:
    """Build zoo model ``name`` (seed 0), keep ``cut_count`` cuts spread along it (always the
    last), and calibrate every (cut, codec) on this machine."""
    from secure_ci import zoo

    entry = zoo.get(name)
    torch.manual_seed(0)
    model = entry.build().eval()
    example = torch.zeros(entry.input_shape)
    partitioner = Partitioner(model, (example,))
    n = len(partitioner.cuts)
    picks = sorted({round(i * (n - 1) / max(1, cut_count - 1)) for i in range(cut_count)})
    cuts = tuple(partitioner.cuts[i].index for i in picks)
    measured = profile(partitioner, repeats=repeats, threads=1)
    by_index = {c.index: c for c in measured.cuts}
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(entry.input_shape, generator=generator) for _ in range(samples)]
    heads: dict[int, nn.Module] = {EDGE_ONLY_CUT: _InputHead()}
    compute: list[float] = []
    tails = [
        replace(t, tail=_Timed(t.tail, compute))
        for t in tails_from_partitioner(partitioner, cuts, CODECS)
    ]
    specs = tuple(TensorSpec((1, *s.shape[1:]), s.dtype) for s in partitioner.input_specs)
    model_id = bytes.fromhex(partitioner.model_id)
    tails.append(
        TailEntry(model_id, EDGE_ONLY_CUT, _Timed(model, compute), specs, frozenset(CODECS))
    )
    rows: dict[int, tuple[list[float], list[float], list[float]]] = {}
    torch.set_num_threads(1)
    with torch.inference_mode():
        for cut in (EDGE_ONLY_CUT, *cuts):
            if cut != EDGE_ONLY_CUT:
                heads[cut] = partitioner.split(cut)[0]
            out = heads[cut](example)
            boundary = out if isinstance(out, tuple) else (out,)
            sizes, enc, dec = [], [], []
            for codec in CODECS:
                payload = encode_features(boundary, codec)
                sizes.append(float(len(payload)))
                enc.append(_median_ms(partial(encode_features, boundary, codec), repeats))
                dec.append(_median_ms(partial(decode_features, payload), repeats))
            rows[cut] = (sizes, enc, dec)
    order = (EDGE_ONLY_CUT, *cuts)
    # the whole model, as the median of its run and of head + tail at every kept cut: the
    # profile times each piece at another moment, and on a loaded machine a lone full run
    # can come out slower than the last cut's head (which would make a split at the last
    # cut look cheaper than running everything locally, though it is that plus a transfer)
    full = statistics.median(
        [measured.full_ms, *(by_index[c].head_ms + by_index[c].tail_ms for c in cuts)]
    )
    costs = ModelCosts(
        cuts=order,
        codecs=CODECS,
        head_ms=(0.0, *(by_index[c].head_ms for c in cuts)),
        tail_ms=(full, *(by_index[c].tail_ms for c in cuts)),
        device_full_ms=full,
        nbytes=tuple(tuple(rows[c][0]) for c in order),
        encode_ms=tuple(tuple(rows[c][1]) for c in order),
        decode_ms=tuple(tuple(rows[c][2]) for c in order),
        # latency is what is compared: every codec is admissible (both planner and oracle)
        accuracy_drop=tuple(tuple(0.0 for _ in CODECS) for _ in order),
    )
    return ModelRig(name, partitioner, cuts, costs, heads, tails, inputs, compute)


@dataclass(frozen=True)
class Measurement:
    """One real task: total latency, device part, send-to-result, edge compute, bytes."""

    latency_ms: float
    device_ms: float
    round_trip_ms: float = 0.0
    compute_ms: float = 0.0
    nbytes: float = 0.0


class Device:
    """Runs a task of any configuration of any rig, for real, one at a time."""

    def __init__(self, address: str, enclave: DevEnclave, identity: DeviceIdentity) -> None:
        self.address = address
        self.enclave = enclave
        self.identity = identity
        self.slowdown = 1.0
        self._stack = contextlib.AsyncExitStack()
        self._sessions: dict[tuple[str, int, str], Session] = {}
        self._seq = 1

    async def aclose(self) -> None:
        await self._stack.aclose()

    async def session(self, rig: ModelRig, cut: int, codec: str) -> Session:
        key = (rig.model_id, cut, codec)
        current = self._sessions.get(key)
        if current is not None and not getattr(current, "failed", False):
            return current
        self._seq += 10**9  # every session's request sequence starts above the last one's
        current = await self._stack.enter_async_context(
            open_session(
                self.address,
                policy=self.enclave.policy,
                collateral=self.enclave.collateral,
                identity=self.identity,
                model=rig.heads[cut],
                plan=PartitionPlan(rig.model_id, cut, codec),
                clock=lambda: float(DEV_NOW),
                timeout=60.0,
                first_seq=self._seq,
            )
        )
        self._sessions[key] = current
        return current

    async def open_all(self, rig: ModelRig) -> None:
        for cut in rig.costs.cuts:
            for codec in CODECS:
                await self.session(rig, cut, codec)

    def _slow(self, started: float, profiled_ms: float) -> float:
        """Sleep off the emulated slowdown of the device work since ``started``; its ms.

        The emulated device is ``slowdown`` times slower than the profile says, steadily:
        it sleeps ``slowdown - 1`` times the *profiled* time of the work it just did. (Times
        the time the work took here would multiply this shared machine's load jitter by the
        slowdown: a 10x device would swing by ten times the host's hiccups.)
        """
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * profiled_ms * 1e-3)
        return (time.perf_counter() - started) * 1e3

    async def run(
        self, rig: ModelRig, configuration: Configuration, x: torch.Tensor
    ) -> Measurement:
        start = time.perf_counter()
        if configuration.cut == DEVICE_ONLY_CUT:
            with torch.inference_mode():
                rig.partitioner.model(x)
            device_ms = self._slow(start, rig.costs.device_full_ms)
            return Measurement(device_ms, device_ms)
        if configuration.codec is None:  # pragma: no cover - Configuration forbids it
            raise SecureCIError("a split needs a codec")
        session = await self.session(rig, configuration.cut, configuration.codec)
        payload = session.encode_input(x)
        row, col = (
            rig.costs.position(configuration.cut),
            rig.costs.codecs.index(configuration.codec),
        )
        device_ms = self._slow(start, rig.costs.head_ms[row] + rig.costs.encode_ms[row][col])
        sent = time.perf_counter()
        rig.compute_ms.clear()
        await session.infer_encoded(payload)
        done = time.perf_counter()
        compute = rig.compute_ms[-1] if rig.compute_ms else 0.0
        return Measurement(
            (done - start) * 1e3, device_ms, (done - sent) * 1e3, compute, float(len(payload))
        )


@contextlib.asynccontextmanager
async def open_edge_for(
    rigs: Sequence[ModelRig],
) -> AsyncIterator[tuple[int, DevEnclave, DeviceIdentity]]:
    """An in-process edge serving every rig's tails (and edge-only), for one device."""
    enclave = dev_enclave(DEV_NOW)
    identity = DeviceIdentity.generate()
    models = ModelRegistry()
    for rig in rigs:
        for tail in rig.tails:
            models.add(tail)
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=0.0, idle_timeout=86_400.0, request_timeout=120.0),
        allowed_devices=frozenset({identity.address}),
    )
    async with open_edge(
        config, provider=enclave.provider, models=models, clock=lambda: float(DEV_NOW)
    ) as edge:
        yield edge.port, enclave, identity
