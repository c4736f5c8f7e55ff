"""A bandwidth step: the link's detector tells the planner, which then switches at once."""

from __future__ import annotations

import numpy as np
import pytest

from secure_ci.exceptions import ConfigError
from secure_ci.plan import (
    DEVICE_ONLY_CUT,
    EDGE_ONLY_CUT,
    Configuration,
    EdgeEstimate,
    EdgeEstimator,
    ModelCosts,
    Planner,
)

LOCAL = Configuration(None, DEVICE_ONLY_CUT, None)
REMOTE = Configuration("e", EDGE_ONLY_CUT, "float16")
PAYLOAD = 6170.0  # bytes of the edge-only boundary


def costs() -> ModelCosts:
    """Device-only 30 ms; edge-only: 6170 bytes, 7 ms of tail."""
    return ModelCosts(
        cuts=(EDGE_ONLY_CUT,),
        codecs=("float16",),
        head_ms=(0.0,),
        tail_ms=(7.0,),
        device_full_ms=30.0,
        nbytes=((PAYLOAD,),),
        encode_ms=((0.0,),),
        decode_ms=((0.0,),),
        accuracy_drop=((0.0,),),
    )


def _remote(intercept: float, steps: int) -> dict[str, EdgeEstimate]:
    return {"e": EdgeEstimate(intercept_ms=intercept, ms_per_byte=0.0, link_steps=steps)}


def test_a_detected_step_lets_a_margin_sized_gain_in_at_once() -> None:
    planner = Planner(costs(), ["e"], margin=0.1, patience=3, jump=0.5)
    assert planner.decide(_remote(13.0, 0), now=0).configuration == REMOTE  # 20 vs 30 ms
    # remote now 33 ms vs 30: a 9 % gain, below the margin: held even after a step
    d = planner.decide(_remote(26.0, 1), now=1)
    assert (d.configuration, d.reason) == (REMOTE, "hold")
    # remote 40 ms vs 30 (25 %) without a new step: patience applies
    d = planner.decide(_remote(33.0, 1), now=2)
    assert (d.configuration, d.reason) == (REMOTE, "hold")
    # the detector fires again: the same gain is taken at once
    d = planner.decide(_remote(33.0, 2), now=3)
    assert (d.configuration, d.reason, d.switched) == (LOCAL, "step", True)
    # an edge seen for the first time is no step, whatever its count
    fresh = Planner(costs(), ["e"], margin=0.1, patience=3)
    fresh.decide(_remote(13.0, 5), now=0)
    assert fresh.decide(_remote(33.0, 5), now=1).reason == "hold"


def test_link_steps_must_be_a_count() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="link_steps"):
            EdgeEstimate(intercept_ms=1.0, ms_per_byte=0.0, link_steps=bad)  # type: ignore[arg-type]


def _requests_to_switch(
    rng: np.random.Generator, planner: Planner, edge: EdgeEstimator, mbps: float, n: int
) -> tuple[int | None, list[str]]:
    """Run ``n`` requests on a link of ``mbps`` (10 ms intercept, ±5 % jitter); every request
    also sends a padded probe, as an idle device does. The first request that switched."""
    first: int | None = None
    reasons = []
    for k in range(1, n + 1):
        decision = planner.decide({"e": edge.estimate()}, now=float(k))
        reasons.append(decision.reason)
        if decision.switched and first is None:
            first = k
        sizes = [float(edge.link.probe_bytes())]
        if decision.configuration == REMOTE:
            sizes.append(PAYLOAD)
        for nbytes in sizes:
            network = (10.0 + nbytes * 8.0 / (mbps * 1e3)) * rng.uniform(0.95, 1.05)
            edge.observe_result(
                nbytes=nbytes, round_trip_ms=network + 7.0, queue_ms=0.0, compute_ms=7.0,
                profiled_compute_ms=7.0, now=float(k),
            )  # fmt: skip
    return first, reasons


@pytest.mark.parametrize("seed", range(5))
def test_a_square_wave_switches_within_three_requests_of_each_step(seed: int) -> None:
    """20 <-> 2 Mbit/s: remote 19.5 vs 42 ms against device-only 30 ms, gains of 35 % and
    29 %, below the jump: without the detector's word the planner waited out ``patience``
    (4 or 5 requests); now the request after the one that shows the step switches (2, or 3
    when the first probe after a step up falls just short of the detector's threshold)."""
    rng = np.random.default_rng(seed)
    planner, edge = Planner(costs(), ["e"], margin=0.1, patience=3, jump=0.5), EdgeEstimator()
    first, _ = _requests_to_switch(rng, planner, edge, 20.0, 40)
    assert planner.current == REMOTE
    for mbps, after in ((2.0, LOCAL), (20.0, REMOTE), (2.0, LOCAL), (20.0, REMOTE)):
        first, reasons = _requests_to_switch(rng, planner, edge, mbps, 20)
        assert first is not None, reasons
        assert first <= 3, reasons
        assert reasons[first - 1] in {"step", "jump"}
        assert planner.current == after
        assert reasons[first:] == ["hold"] * (20 - first)  # and it stays put


@pytest.mark.parametrize("mbps", [2.0, 5.0, 20.0])
def test_stationary_bandwidth_noise_does_not_flap(mbps: float) -> None:
    """±20 % bandwidth noise for 600 requests: at most one change (the first correction)."""
    rng = np.random.default_rng(int(mbps))
    planner, edge = Planner(costs(), ["e"]), EdgeEstimator()
    switches = 0
    for k in range(600):
        decision = planner.decide({"e": edge.estimate()}, now=k * 0.1)
        switches += decision.switched and k > 0
        sizes = [float(edge.link.probe_bytes())]
        if decision.configuration == REMOTE:
            sizes.append(PAYLOAD)
        for nbytes in sizes:
            rate = mbps * rng.uniform(0.8, 1.2)
            network = 10.0 * rng.uniform(0.95, 1.05) + nbytes * 8.0 / (rate * 1e3)
            edge.observe_result(
                nbytes=nbytes, round_trip_ms=network + 7.0, queue_ms=0.0, compute_ms=7.0,
                profiled_compute_ms=7.0, now=k * 0.1,
            )  # fmt: skip
    assert switches <= 1
