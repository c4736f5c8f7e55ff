"""A pure simulation of the planner against a known world, and its regret vs an oracle.

:func:`simulate` runs ``tasks`` sequential tasks: before each one, idle sessions are pinged
(a tiny ping for the RTT, and a padded probe sized by :meth:`LinkEstimator.probe_bytes` so
the link's slope is learned even while no features are sent; the probes' own link time is
not charged to the tasks); the planner decides from the
estimators; the world (true link, edge queue and speed, device slowdown, each measurement
with multiplicative noise) realises the task; the estimators are updated the way a device
updates them (its own round trip, the edge's reported queue and compute time). Regret is
measured in expectation: the true expected cost of the chosen configuration over that of
the exhaustive oracle (which knows the world) at the same moment. Randomness comes only
from the ``rng`` argument, so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_ci.exceptions import ConfigError
from secure_ci.partition import ExitPolicy
from secure_ci.plan._cost import (
    EDGE_ONLY_CUT,
    Configuration,
    EdgeEstimate,
    ExitCalibration,
    ModelCosts,
)
from secure_ci.plan._estimators import EdgeEstimator, SpeedEstimator
from secure_ci.plan._planner import Planner
from secure_ci.plan._table import ConfigurationSpace

__all__ = [
    "SimulatedEdge",
    "SimulationResult",
    "constant",
    "perturb_costs",
    "regret_grid",
    "simulate",
    "small_cnn_costs",
]


def _zero(_t: float) -> float:
    return 0.0


def constant(value: float) -> Callable[[float], float]:
    """A function of time that is always ``value`` (a stationary link)."""
    return lambda _t: value


@dataclass(frozen=True)
class SimulatedEdge:
    """The truth about one edge: uplink (Mbit/s) and RTT (ms) over time, queue, speed."""

    name: str
    uplink_mbps: Callable[[float], float]
    rtt_ms: Callable[[float], float]
    queue_ms: Callable[[float], float] = _zero
    speed_factor: float = 1.0

    def estimate(self, t: float) -> EdgeEstimate:
        """The exact cost model inputs at time ``t`` (what the oracle knows)."""
        mbps = self.uplink_mbps(t)
        if not (math.isfinite(mbps) and mbps > 0):
            raise ConfigError(f"uplink of {self.name} must be > 0 Mbit/s, got {mbps}")
        return EdgeEstimate(
            intercept_ms=self.rtt_ms(t),
            ms_per_byte=8.0 / (mbps * 1e3),
            queue_ms=self.queue_ms(t),
            speed_factor=self.speed_factor,
        )


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Per task: start time, chosen and oracle configuration, true expected and realised ms.

    ``switches`` counts plan changes between consecutive tasks of this run.
    """

    times: npt.NDArray[np.float64]
    chosen: npt.NDArray[np.intp]
    oracle: npt.NDArray[np.intp]
    expected_ms: npt.NDArray[np.float64]
    oracle_ms: npt.NDArray[np.float64]
    latency_ms: npt.NDArray[np.float64]
    switches: int
    warmup: int
    labels: tuple[str, ...] = field(repr=False)

    @property
    def regret(self) -> npt.NDArray[np.float64]:
        """Per task: true expected cost of the choice / the oracle's − 1."""
        return self.expected_ms / self.oracle_ms - 1.0

    def summary(self) -> dict[str, Any]:
        """Aggregates over the tasks after ``warmup``."""
        s = slice(self.warmup, None)
        regret = self.regret[s]
        return {
            "tasks": int(regret.size),
            "regret": float(self.expected_ms[s].sum() / self.oracle_ms[s].sum() - 1.0),
            "regret_p50": float(np.median(regret)),
            "regret_p95": float(np.percentile(regret, 95)),
            "oracle_share": float(np.mean(self.chosen[s] == self.oracle[s])),
            "latency_ms_mean": float(self.latency_ms[s].mean()),
            "oracle_ms_mean": float(self.oracle_ms[s].mean()),
            "switches": self.switches,
            "final": self.labels[int(self.chosen[-1])],
            "oracle_final": self.labels[int(self.oracle[-1])],
        }


def simulate(
    costs: ModelCosts,
    edges: Sequence[SimulatedEdge],
    *,
    tasks: int,
    rng: np.random.Generator,
    planner: Planner | None = None,
    true_costs: ModelCosts | None = None,
    device_slowdown: float = 1.0,
    noise: float = 0.1,
    interval_s: float = 0.1,
    ping_interval_s: float = 1.0,
    deadline_ms: float = math.inf,
    warmup: int = 20,
) -> SimulationResult:
    """Run ``tasks`` decisions of ``planner`` (a fresh default one if None) in a true world.

    The planner knows ``costs`` (the package's profile); the world runs ``true_costs`` (the
    same cuts, codecs and exits with other numbers; ``costs`` itself if None), slowed down
    on the device by ``device_slowdown``.
    """
    if tasks < 1 or not 0.0 <= noise < 1.0 or device_slowdown <= 0 or interval_s < 0:
        raise ConfigError("tasks >= 1, noise in [0, 1), device_slowdown > 0 needed")
    names = [e.name for e in edges]
    planner = planner if planner is not None else Planner(costs, names)
    space = planner.space
    if list(space.edges) != names or space.costs is not costs:
        raise ConfigError("the planner must be built for these costs and these edges")
    world = space
    if true_costs is not None:
        world = ConfigurationSpace(true_costs, names, device_only=space.device_only)
        if [_shape(c) for c in world.configurations] != [_shape(c) for c in space.configurations]:
            raise ConfigError("true costs must have the planner's cuts, codecs and exits")
    estimators = {name: EdgeEstimator() for name in names}
    device = SpeedEstimator()
    last_ping = dict.fromkeys(names, -math.inf)

    def jitter() -> float:
        return float(rng.uniform(1.0 - noise, 1.0 + noise))

    out = np.zeros((4, tasks))
    picks = np.zeros((2, tasks), dtype=np.intp)
    t = 0.0
    for k in range(tasks):
        for edge in edges:
            if t - last_ping[edge.name] >= ping_interval_s:
                est, true = estimators[edge.name], edge.estimate(t)
                est.observe_ping(true.intercept_ms * jitter(), now=t)
                probe = est.link.probe_bytes()
                est.link.update(probe, true.network_ms(probe) * jitter(), now=t)
                last_ping[edge.name] = t
        decision = planner.decide(
            {n: e.estimate() for n, e in estimators.items()},
            now=t,
            device_speed=device.factor,
            deadline_ms=deadline_ms,
        )
        truth = world.evaluate({e.name: e.estimate(t) for e in edges}, device_speed=device_slowdown)
        usable = world.accuracy_drop <= planner.accuracy_budget
        in_time = usable & (truth.full_path_ms <= deadline_ms)
        pool = in_time if in_time.any() else usable
        oracle = int(np.argmin(np.where(pool, truth.expected_ms, np.inf)))
        i = decision.index
        if rng.random() < world.p_exit[i]:
            latency = device_slowdown * float(world.exit_ms[i]) * jitter()
            device.update(latency, float(space.exit_ms[i]), now=t)
        else:
            head = device_slowdown * float(world.device_ms[i]) * jitter()
            device.update(head, float(space.device_ms[i]), now=t)
            latency = head
            if decision.configuration.edge is not None:
                edge = edges[names.index(decision.configuration.edge)]
                true = edge.estimate(t)
                nbytes = float(world.nbytes[i])
                network = true.network_ms(nbytes) * jitter()
                queue = true.queue_ms * jitter()
                compute = edge.speed_factor * float(world.edge_ms[i]) * jitter()
                latency += network + queue + compute
                estimators[edge.name].observe_result(
                    nbytes=nbytes,
                    round_trip_ms=network + queue + compute,
                    queue_ms=queue,
                    compute_ms=compute,
                    profiled_compute_ms=float(space.edge_ms[i]),
                    now=t + latency / 1e3,
                )
        out[:, k] = (t, truth.expected_ms[i], truth.expected_ms[oracle], latency)
        picks[:, k] = (i, oracle)
        t += max(interval_s, latency / 1e3)
    return SimulationResult(
        times=out[0],
        chosen=picks[0],
        oracle=picks[1],
        expected_ms=out[1],
        oracle_ms=out[2],
        latency_ms=out[3],
        switches=int(np.count_nonzero(picks[0, 1:] != picks[0, :-1])),
        warmup=min(warmup, tasks - 1),
        labels=tuple(str(c) for c in space.configurations),
    )


def regret_grid(
    costs: ModelCosts,
    *,
    uplinks_mbps: Sequence[float] = (0.5, 2.0, 10.0, 100.0),
    rtts_ms: Sequence[float] = (2.0, 20.0, 100.0),
    slowdowns: Sequence[float] = (1.0, 3.0, 10.0),
    tasks: int = 300,
    seed: int = 0,
    planner: Callable[[], Planner] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """One stationary :func:`simulate` run per (uplink, RTT, device slowdown) cell.

    ``planner`` builds a fresh planner per cell (for the edge named ``"edge"``); ``options``
    go to :func:`simulate`. Each row is the cell's parameters and its ``summary()``.
    """
    rows = []
    for cell, (mbps, rtt, slowdown) in enumerate(
        (m, r, s) for m in uplinks_mbps for r in rtts_ms for s in slowdowns
    ):
        edge = SimulatedEdge("edge", constant(mbps), constant(rtt))
        result = simulate(
            costs,
            [edge],
            tasks=tasks,
            rng=np.random.default_rng([seed, cell]),
            planner=planner() if planner is not None else None,
            device_slowdown=slowdown,
            **options,
        )
        rows.append({"uplink_mbps": mbps, "rtt_ms": rtt, "slowdown": slowdown, **result.summary()})
    return rows


def perturb_costs(
    costs: ModelCosts, rng: np.random.Generator, *, spread: float = 0.2
) -> ModelCosts:
    """``costs`` as if every layer segment, codec and exit took 1 ± ``spread`` times as long.

    A world whose profile was measured imperfectly (or on another day), for
    ``simulate(true_costs=...)``. The segments between consecutive cuts are perturbed, not
    the cumulative times, so heads still grow and tails still shrink along the model and
    the whole model is still the sum of its parts; exit rates move by the same factor
    range, bytes and accuracy stay as they are. Cuts must be listed from input to output.
    """
    if not 0.0 <= spread < 1.0:
        raise ConfigError(f"spread must be in [0, 1), got {spread}")

    def factor() -> float:
        return float(rng.uniform(1.0 - spread, 1.0 + spread))

    def vary(values: Sequence[float]) -> tuple[float, ...]:
        return tuple(v * factor() for v in values)

    heads, done = [], 0.0
    for before, after in zip((0.0, *costs.head_ms[:-1]), costs.head_ms, strict=True):
        done += max(0.0, after - before) * factor()
        heads.append(done)
    full = done + max(0.0, costs.device_full_ms - costs.head_ms[-1]) * factor()
    tails, rest = [], costs.tail_ms[-1] * factor()
    later = (costs.tail_ms[-1], *costs.tail_ms[::-1])
    for here, after in zip(costs.tail_ms[::-1], later[:-1], strict=True):
        rest += max(0.0, here - after) * factor()
        tails.append(rest)
    return ModelCosts(
        cuts=costs.cuts,
        codecs=costs.codecs,
        head_ms=tuple(heads),
        tail_ms=tuple(tails[::-1]),
        device_full_ms=full,
        nbytes=costs.nbytes,
        encode_ms=tuple(vary(row) for row in costs.encode_ms),
        decode_ms=tuple(vary(row) for row in costs.decode_ms),
        accuracy_drop=costs.accuracy_drop,
        exits=tuple(
            ExitCalibration(
                ex.policy, min(1.0, ex.p_exit * factor()), ex.accuracy_drop, ex.head_ms * factor()
            )
            for ex in costs.exits
        ),
    )


def _shape(c: Configuration) -> tuple[str | None, int, str | None, ExitPolicy | None]:
    return (c.edge, c.cut, c.codec, None if c.exit is None else c.exit.policy)


def small_cnn_costs(*, device_full_ms: float = 30.0, edge_full_ms: float = 4.0) -> ModelCosts:
    """Synthetic costs resembling a small 224×224 CNN (MobileNet-like stages, 100 classes).

    Seven cuts from the stem (1.6 MB float32 boundary) to the logits (400 B), edge-only on a
    602 KB float32 input, four codecs with plausible accuracy drops, and two exits (after
    cuts 2 and 4) at two thresholds each: 101 configurations for one edge.
    """
    shares = (0.08, 0.20, 0.38, 0.60, 0.85, 0.97, 1.0)
    sizes = (1_605_632, 802_816, 401_408, 200_704, 100_352, 4_096, 400)
    codecs = ("float32", "float16", "int8", "int4")
    ratio = (1.0, 0.5, 0.25, 0.125)
    cuts = (EDGE_ONLY_CUT, *range(len(shares)))
    all_sizes = (602_112, *sizes)
    drops = [(0.0, 0.0, 0.0, 3.0)] + [
        (0.0, 0.02, 0.1, 1.2 if c < 2 else 0.6) for c in range(len(shares))
    ]
    speed = {"float32": (0.0, 0.0), "float16": (0.3, 0.3), "int8": (0.5, 0.4), "int4": (0.8, 0.6)}
    exits = tuple(
        ExitCalibration(ExitPolicy(cut, "max_softmax", th), p, drop, 0.15)
        for cut, th, p, drop in (
            (2, 0.9, 0.35, 0.4),
            (2, 0.8, 0.5, 0.9),
            (4, 0.9, 0.6, 0.3),
            (4, 0.8, 0.75, 0.8),
        )
    )
    return ModelCosts(
        cuts=cuts,
        codecs=codecs,
        head_ms=(0.0, *(device_full_ms * s for s in shares)),
        tail_ms=(edge_full_ms, *(edge_full_ms * (1.0 - s) for s in shares)),
        device_full_ms=device_full_ms,
        nbytes=tuple(tuple(n * r for r in ratio) for n in all_sizes),
        encode_ms=tuple(tuple(n / 1e6 * speed[c][0] for c in codecs) for n in all_sizes),
        decode_ms=tuple(tuple(n / 1e6 * speed[c][1] for c in codecs) for n in all_sizes),
        accuracy_drop=tuple(drops),
        exits=exits,
    )
