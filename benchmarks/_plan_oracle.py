"""The plan benchmark's measuring parts: the link, the planner fed like a device, the oracle.

The **oracle** measures every configuration of a planner's space for real and keeps each
one's median latency. On a loaded, shared machine one task's latency varies by tens of
percent from one moment to the next, so the oracle works in three passes, every pass
interleaved in a freshly shuffled order each round (a load burst then hits configurations
alike, not the ones that happened to run during it):

1. *screen*: every configuration once, and again those within ``SCREEN_AGAIN`` x the best
   (so one slow outlier cannot discard a contender, while the hopeless big transfers of a
   slow link cost one run);
2. *contenders*: those whose fastest run is within ``CONTENDER`` x the best median get
   ``reps`` more runs;
3. *confirm* (:func:`confirm`, after the planner ran): what the planner chose, the oracle's
   best and the runners-up get ``reps`` more runs side by side, so the planner's regret is
   judged on samples taken in the same minute as the oracle's.

The oracle's **noise floor** is the regret of the best configuration by one half of the
samples (even runs) judged by the other half (odd runs), over the contenders.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

from _plan_rig import EDGE, Device, Measurement, ModelRig

from secure_ci.plan import (
    ConfigurationSpace,
    Decision,
    EdgeEstimator,
    ModelCosts,
    Planner,
    SpeedEstimator,
)
from secure_ci.testing import Link, LinkShaper

SPEED_FLOOR = 0.2
"""Device work profiled below this share of the whole model does not feed the speed factor."""
SCREEN_AGAIN = 3.0
CONTENDER = 1.5
RUNNERS_UP = 3


def link(mbps: float, rtt_ms: float) -> Link:
    rate = mbps * 1e6
    return Link(rate, rtt_ms / 2, max(1024, min(1 << 20, int(rate / 8 * 1e-3))))


def shape(shaper: LinkShaper, mbps: float, rtt_ms: float) -> None:
    shaper.shape(uplink=link(mbps, rtt_ms), downlink=link(mbps, rtt_ms))


def with_codecs(costs: ModelCosts, codecs: tuple[str, ...]) -> ModelCosts:
    """``costs`` restricted to ``codecs`` (a deployment whose accuracy budget admits only
    those)."""
    cols = [costs.codecs.index(c) for c in codecs]

    def pick(rows: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(row[j] for j in cols) for row in rows)

    return replace(
        costs,
        codecs=codecs,
        nbytes=pick(costs.nbytes),
        encode_ms=pick(costs.encode_ms),
        decode_ms=pick(costs.decode_ms),
        accuracy_drop=pick(costs.accuracy_drop),
    )


@dataclass
class PlannerRun:
    """A planner with the estimators a device keeps, fed by real tasks and probes."""

    rig: ModelRig
    device: Device
    probe_s: float
    costs: ModelCosts | None = None  # the rig's, unless restricted (e.g. to some codecs)
    planner: Planner = field(init=False)
    edge: EdgeEstimator = field(default_factory=EdgeEstimator)
    speed: SpeedEstimator = field(default_factory=SpeedEstimator)
    cpu_ms: list[float] = field(default_factory=list)
    pings: list[float] = field(default_factory=list)
    last_probe: float = -math.inf
    sample: int = 0
    last: Decision | None = None

    def __post_init__(self) -> None:
        self.planner = Planner(self.costs or self.rig.costs, [EDGE])
        space = self.planner.space
        remote = [i for i, c in enumerate(space.configurations) if c.edge is not None]
        self._remote = remote
        self._ping = min(remote, key=lambda i: space.nbytes[i])

    def _x(self) -> Any:
        self.sample += 1
        return self.rig.inputs[self.sample % len(self.rig.inputs)]

    def _observe(self, index: int, m: Measurement) -> None:
        space, now = self.planner.space, time.monotonic()
        profiled = float(space.device_ms[index])
        if profiled >= SPEED_FLOOR * self.rig.costs.device_full_ms:
            # a tiny head's time is mostly fixed overhead the profile does not hold: as a
            # ratio it would make the device look many times slower than it is
            self.speed.update(m.device_ms, profiled, now)
        if space.configurations[index].edge is not None:
            self.edge.observe_result(
                nbytes=m.nbytes, round_trip_ms=m.round_trip_ms, queue_ms=0.0,
                compute_ms=m.compute_ms, profiled_compute_ms=float(space.edge_ms[index]),
                now=now,
            )  # fmt: skip

    async def probe(self, force: bool = False) -> None:
        """A smallest-payload task and one sized by ``probe_bytes``, when due (not charged)."""
        if not force and time.monotonic() - self.last_probe < self.probe_s:
            return
        space = self.planner.space
        want = self.edge.link.probe_bytes()
        # the smallest payload of at least the wanted size (a device would pad its probe to
        # it): a smaller one may be as small as the ping, and then the slope goes unseen
        big = [i for i in self._remote if space.nbytes[i] >= want]
        sized = (min(big, key=lambda i: space.nbytes[i]) if big
                 else max(self._remote, key=lambda i: space.nbytes[i]))  # fmt: skip
        for index in (self._ping, sized):
            m = await self.device.run(self.rig, space.configurations[index], self._x())
            self._observe(index, m)
            if index == self._ping:
                self.pings.append(m.round_trip_ms - m.compute_ms)
        self.last_probe = time.monotonic()

    async def task(self) -> tuple[int, bool, Measurement]:
        """Decide (timed, CPU of this thread) and run one task; (index, switched, measurement)."""
        await self.probe()
        start = time.thread_time()
        decision = self.planner.decide(
            {EDGE: self.edge.estimate()}, now=time.monotonic(), device_speed=self.speed.factor
        )
        self.cpu_ms.append((time.thread_time() - start) * 1e3)
        self.last = decision
        m = await self.device.run(self.rig, decision.configuration, self._x())
        self._observe(decision.index, m)
        return decision.index, decision.switched, m


@dataclass
class Oracle:
    """Every configuration's measured latencies (ms) in one cell."""

    rig: ModelRig
    device: Device
    space: ConfigurationSpace
    reps: int
    rng: random.Random
    samples: list[list[float]] = field(default_factory=list)
    device_samples: list[list[float]] = field(default_factory=list)  # the device's part
    contenders: list[int] = field(default_factory=list)

    @property
    def table(self) -> list[float]:
        """Median latency per configuration."""
        return [statistics.median(s) for s in self.samples]

    @property
    def best(self) -> int:
        table = self.table
        return min(range(len(table)), key=table.__getitem__)

    @property
    def runs(self) -> int:
        return sum(len(s) for s in self.samples)

    @property
    def noise_regret(self) -> float:
        """Regret of the best by the even runs, judged by the odd ones (over contenders)."""
        both = [i for i in self.contenders if len(self.samples[i]) >= 2]
        if len(both) < 1:
            return math.nan
        even = {i: statistics.median(self.samples[i][0::2]) for i in both}
        odd = {i: statistics.median(self.samples[i][1::2]) for i in both}
        return odd[min(both, key=even.__getitem__)] / min(odd.values()) - 1.0

    async def measure(self, indices: list[int], rounds: int) -> None:
        """``rounds`` runs of each of ``indices``, interleaved, shuffled every round."""
        for _ in range(rounds):
            order = list(indices)
            self.rng.shuffle(order)
            for i in order:
                x = self.rig.inputs[self.rng.randrange(len(self.rig.inputs))]
                m = await self.device.run(self.rig, self.space.configurations[i], x)
                self.samples[i].append(m.latency_ms)
                self.device_samples[i].append(m.device_ms)


async def measure_oracle(
    rig: ModelRig, device: Device, reps: int, *, costs: ModelCosts | None = None, seed: int = 0
) -> Oracle:
    """Screen every configuration, then measure the contenders ``reps`` more times."""
    space = Planner(costs or rig.costs, [EDGE]).space
    oracle = Oracle(rig, device, space, reps, random.Random(seed))
    oracle.samples = [[] for _ in space.configurations]
    oracle.device_samples = [[] for _ in space.configurations]
    everything = list(range(len(space.configurations)))
    await oracle.measure(everything, 1)
    first = min(oracle.table)
    await oracle.measure([i for i in everything if oracle.samples[i][0] <= SCREEN_AGAIN * first], 1)
    best = min(oracle.table)
    oracle.contenders = [i for i in everything if min(oracle.samples[i]) <= CONTENDER * best]
    await oracle.measure(oracle.contenders, reps)
    return oracle


async def confirm(oracle: Oracle, chosen: set[int]) -> None:
    """``reps`` more runs of the planner's choices, the best and the runners-up, together."""
    table = oracle.table
    ranked = sorted(oracle.contenders, key=table.__getitem__)[:RUNNERS_UP]
    picked = sorted(chosen.union(ranked))
    oracle.contenders = sorted(set(oracle.contenders).union(picked))
    await oracle.measure(picked, oracle.reps)
