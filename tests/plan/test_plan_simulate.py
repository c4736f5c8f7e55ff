"""The pure simulation: oracle, regret, and the planner in stationary and stepping worlds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import ConfigError
from secure_ci.plan import (
    ModelCosts,
    Planner,
    SimulatedEdge,
    constant,
    perturb_costs,
    regret_grid,
    simulate,
    small_cnn_costs,
)

COSTS = small_cnn_costs()


def test_small_cnn_costs_has_a_hundred_configurations() -> None:
    assert len(Planner(COSTS, ["e"]).configurations) == 101
    modes = {c.mode for c in Planner(COSTS, ["e"]).configurations}
    assert modes == {"device", "edge", "split"}


def test_simulated_edge_is_the_exact_cost_model_input() -> None:
    edge = SimulatedEdge("e", constant(8.0), constant(20.0), constant(3.0), speed_factor=2.0)
    truth = edge.estimate(0.0)
    assert truth.network_ms(1_000_000) == pytest.approx(20.0 + 1000.0)  # 1 MB at 8 Mbit/s
    assert (truth.queue_ms, truth.speed_factor) == (3.0, 2.0)
    with pytest.raises(ConfigError, match="uplink"):
        SimulatedEdge("e", constant(0.0), constant(1.0)).estimate(0.0)


def test_noiseless_stationary_world_is_learned_to_the_oracle() -> None:
    edge = SimulatedEdge("e", constant(10.0), constant(20.0))
    result = simulate(COSTS, [edge], tasks=150, rng=np.random.default_rng(0), noise=0.0)
    assert result.regret.min() >= -1e-9  # nothing beats the oracle in expectation
    summary = result.summary()
    assert summary["tasks"] == 130
    assert summary["regret"] == pytest.approx(0.0, abs=1e-9)
    assert summary["final"] == summary["oracle_final"]
    assert result.latency_ms.shape == result.times.shape == (150,)
    assert np.all(np.diff(result.times) >= 0.1 - 1e-12)


def test_the_planner_learns_a_slow_device_and_moves_to_the_edge() -> None:
    edge = SimulatedEdge("e", constant(100.0), constant(2.0))
    planner = Planner(COSTS, ["e"])
    result = simulate(
        COSTS, [edge], tasks=100, rng=np.random.default_rng(1), planner=planner,
        device_slowdown=10.0, noise=0.2,
    )  # fmt: skip
    assert result.chosen[0] != result.oracle[0]  # the profile does not know the slowdown yet
    assert planner.configurations[result.chosen[-1]].edge == "e"
    assert result.summary()["oracle_share"] == 1.0


def test_a_bandwidth_step_down_is_followed_within_three_tasks() -> None:
    def uplink(t: float) -> float:
        return 20.0 if t < 10.0 else 2.0

    edge = SimulatedEdge("e", uplink, constant(20.0))
    planner = Planner(COSTS, ["e"], accuracy_budget=0.5)
    result = simulate(
        COSTS, [edge], tasks=200, rng=np.random.default_rng(2), planner=planner,
        device_slowdown=10.0, noise=0.2,
    )  # fmt: skip
    step = int(np.argmax(result.times >= 10.0))
    assert result.oracle[step] != result.oracle[step - 1]
    assert np.all(result.regret[step - 20 : step] <= 0.1)  # settled before the step
    back = int(np.argmax(result.regret[step:] <= 0.1))
    assert back <= 3
    assert np.all(result.regret[step + back :] <= 0.1)


@settings(max_examples=8)
@given(
    mbps=st.floats(0.5, 100.0),
    rtt=st.floats(2.0, 100.0),
    slowdown=st.floats(1.0, 10.0),
    budget=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_hysteresis_does_not_flap_on_stationary_noise(
    mbps: float, rtt: float, slowdown: float, budget: float, seed: int
) -> None:
    """±20 % noise on every measurement: at most one plan change in 1,000 decisions."""
    edge = SimulatedEdge("e", constant(mbps), constant(rtt))
    result = simulate(
        COSTS, [edge], tasks=1050, rng=np.random.default_rng(seed),
        planner=Planner(COSTS, ["e"], accuracy_budget=budget), device_slowdown=slowdown,
        noise=0.2,
    )  # fmt: skip
    settled = result.chosen[50:]  # after learning the device and the link
    assert np.count_nonzero(settled[1:] != settled[:-1]) <= 1


def test_regret_grid_rows() -> None:
    rows = regret_grid(
        COSTS, uplinks_mbps=(2.0, 50.0), rtts_ms=(10.0,), slowdowns=(1.0, 5.0), tasks=60,
        planner=lambda: Planner(COSTS, ["edge"], accuracy_budget=0.5), noise=0.1,
    )  # fmt: skip
    assert [(r["uplink_mbps"], r["slowdown"]) for r in rows] == [
        (2.0, 1.0), (2.0, 5.0), (50.0, 1.0), (50.0, 5.0)
    ]  # fmt: skip
    for row in rows:
        assert row["tasks"] == 40
        assert row["regret"] >= -1e-9
        assert math.isfinite(row["latency_ms_mean"])


def test_simulation_arguments_are_checked() -> None:
    edge = SimulatedEdge("e", constant(10.0), constant(20.0))
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError):
        simulate(COSTS, [edge], tasks=0, rng=rng)
    with pytest.raises(ConfigError, match="planner"):
        simulate(COSTS, [edge], tasks=5, rng=rng, planner=Planner(COSTS, ["other"]))


def test_perturbed_costs_keep_the_model_consistent() -> None:
    assert perturb_costs(COSTS, np.random.default_rng(0), spread=0.0) == COSTS
    world = perturb_costs(COSTS, np.random.default_rng(0), spread=0.4)
    assert world != COSTS
    assert list(world.head_ms) == sorted(world.head_ms)  # heads still grow along the model
    assert world.device_full_ms >= world.head_ms[-1]
    assert list(world.tail_ms[1:]) == sorted(world.tail_ms[1:], reverse=True)
    assert (world.nbytes, world.accuracy_drop) == (COSTS.nbytes, COSTS.accuracy_drop)
    for ours, theirs in zip(COSTS.exits, world.exits, strict=True):
        assert ours.policy == theirs.policy
        assert 0.6 * ours.p_exit <= theirs.p_exit <= 1.4 * ours.p_exit
    with pytest.raises(ConfigError):
        perturb_costs(COSTS, np.random.default_rng(0), spread=1.0)


def test_the_world_may_differ_from_the_profile() -> None:
    world = perturb_costs(COSTS, np.random.default_rng(3), spread=0.3)
    edge = SimulatedEdge("e", constant(10.0), constant(20.0))
    result = simulate(
        COSTS, [edge], tasks=120, rng=np.random.default_rng(4), true_costs=world, noise=0.1
    )
    assert result.regret.min() >= -1e-9  # measured against the oracle of the true world
    other = small_cnn_costs()
    fewer = ModelCosts(
        cuts=other.cuts, codecs=other.codecs, head_ms=other.head_ms, tail_ms=other.tail_ms,
        device_full_ms=other.device_full_ms, nbytes=other.nbytes, encode_ms=other.encode_ms,
        decode_ms=other.decode_ms, accuracy_drop=other.accuracy_drop, exits=other.exits[:1],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="true costs"):
        simulate(COSTS, [edge], tasks=5, rng=np.random.default_rng(0), true_costs=fewer)
