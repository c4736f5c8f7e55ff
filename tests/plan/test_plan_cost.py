"""The cost model against hand-computed cases, and the validation of its inputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from secure_ci.exceptions import ConfigError
from secure_ci.partition import CutProfile, ExitPolicy, Profile
from secure_ci.plan import (
    DEVICE_ONLY_CUT,
    EDGE_ONLY_CUT,
    Configuration,
    ConfigurationSpace,
    EdgeEstimate,
    ExitCalibration,
    ModelCosts,
    predict,
)

# the exit of the ``tiny_costs`` fixture (conftest.py)
EXIT = ExitCalibration(
    ExitPolicy(0, "max_softmax", 0.9), p_exit=0.4, accuracy_drop=0.3, head_ms=1.0
)
EDGE = EdgeEstimate(intercept_ms=5.0, ms_per_byte=0.01, queue_ms=2.0, speed_factor=2.0)


def test_split_with_exit_by_hand(tiny_costs: ModelCosts) -> None:
    assert tiny_costs.exits == (EXIT,)
    config = Configuration("e", 1, "int8", EXIT)
    cost = predict(tiny_costs, config, EDGE, device_speed=1.5)
    assert cost.device_ms == pytest.approx(1.5 * (6 + 1 + 0.05))  # head + exit head + encode
    assert cost.network_ms == pytest.approx(5 + 25 * 0.01)
    assert cost.queue_ms == 2.0
    assert cost.edge_ms == pytest.approx(2 * (3 + 0.05))  # (tail + decode) x edge speed
    assert cost.full_path_ms == pytest.approx(10.575 + 5.25 + 2 + 6.1)
    assert cost.exit_path_ms == pytest.approx(1.5 * (2 + 1))  # head to the exit cut + exit
    assert cost.expected_ms == pytest.approx(0.4 * 4.5 + 0.6 * 23.925)
    assert cost.accuracy_drop == pytest.approx(0.3 + 0.1)
    assert cost.to_json()["configuration"] == "e cut 1 int8 exit@0 max_softmax>=0.9"


def test_device_only_and_edge_only_by_hand(tiny_costs: ModelCosts) -> None:
    costs = tiny_costs
    local = predict(costs, Configuration(None, DEVICE_ONLY_CUT, None), None, device_speed=1.5)
    assert (local.expected_ms, local.network_ms, local.accuracy_drop) == (15.0, 0.0, 0.0)
    local_exit = predict(
        costs, Configuration(None, DEVICE_ONLY_CUT, None, EXIT), None, device_speed=1.5
    )
    assert local_exit.expected_ms == pytest.approx(0.4 * 4.5 + 0.6 * 1.5 * (10 + 1))
    remote = predict(costs, Configuration("e", EDGE_ONLY_CUT, "float32"), EDGE, device_speed=1.5)
    assert remote.device_ms == 0.0
    assert remote.expected_ms == pytest.approx(5 + 1000 * 0.01 + 2 + 2 * 10)
    assert str(remote.configuration) == "e edge-only float32"


def test_predictive_std_adds_network_and_queue_variance(tiny_costs: ModelCosts) -> None:
    edge = EdgeEstimate(
        intercept_ms=5.0, ms_per_byte=0.01, var_coeffs=(1.0, 0.01, 1e-4), queue_var=3.0
    )
    cost = predict(tiny_costs, Configuration("e", 0, "float32"), edge)
    assert cost.std_ms == pytest.approx(math.sqrt(1 + 0.01 * 4000 + 1e-4 * 4000**2 + 3))


def test_vectorised_table_equals_scalar_prediction(tiny_costs: ModelCosts) -> None:
    costs = tiny_costs
    space = ConfigurationSpace(costs, ["e", "f"])
    estimates = {"e": EDGE, "f": EdgeEstimate(intercept_ms=1.0, ms_per_byte=0.002, queue_ms=9)}
    table = space.evaluate(estimates, device_speed=1.5)
    for i, config in enumerate(space.configurations):
        edge = None if config.edge is None else estimates[config.edge]
        expected = predict(costs, config, edge, device_speed=1.5)
        got = table.breakdown(i).to_json()
        want = expected.to_json()
        assert got.pop("configuration") == want.pop("configuration")
        assert got == pytest.approx(want)


def test_configuration_space_enumerates_every_valid_combination(tiny_costs: ModelCosts) -> None:
    space = ConfigurationSpace(tiny_costs, ["e", "f"])
    # device-only with and without the exit; per edge: edge-only x 2 codecs (no exit),
    # cut 0 and cut 1 x 2 codecs x (no exit, exit at cut 0)
    assert len(space.configurations) == 2 + 2 * (2 + 2 * 2 * 2)
    assert len(set(space.configurations)) == len(space.configurations)
    assert all(c.exit is None for c in space.configurations if c.mode == "edge")
    assert ConfigurationSpace(tiny_costs, [], device_only=True).configurations[0].mode == "device"
    with pytest.raises(ConfigError, match="no configuration"):
        ConfigurationSpace(tiny_costs, [], device_only=False)
    with pytest.raises(ConfigError, match="distinct"):
        ConfigurationSpace(tiny_costs, ["e", "e"])


def test_missing_edges_are_unavailable(tiny_costs: ModelCosts) -> None:
    space = ConfigurationSpace(tiny_costs, ["e", "f"])
    table = space.evaluate({"e": EDGE})
    for config, available in zip(space.configurations, table.available, strict=True):
        assert available == (config.edge in (None, "e"))


@pytest.mark.parametrize(
    ("edge", "cut", "codec", "exit_", "match"),
    [
        (None, 0, "int8", None, "device-only"),
        ("e", DEVICE_ONLY_CUT, None, None, "device-only"),
        ("e", 0, None, None, "device-only"),
        ("e", EDGE_ONLY_CUT, "int8", EXIT, "edge-only"),
        (
            "e",
            0,
            "int8",
            ExitCalibration(ExitPolicy(1, "entropy", 0.5), 0.5, 0.1, 1.0),
            "beyond",
        ),
    ],
)
def test_configuration_rejects_impossible_combinations(
    edge: str | None, cut: int, codec: str | None, exit_: ExitCalibration | None, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Configuration(edge, cut, codec, exit_)


def test_exit_calibration_validation_and_label() -> None:
    policy = ExitPolicy(2, "entropy", 0.25)
    assert str(ExitCalibration(policy, 0.5, 0.1, 0.2)) == "exit@2 entropy<=0.25"
    for p, drop, head in ((1.5, 0, 0), (0.5, -1, 0), (0.5, 0, math.inf), (math.nan, 0, 0)):
        with pytest.raises(ConfigError):
            ExitCalibration(policy, p, drop, head)
    with pytest.raises(ConfigError, match="ExitPolicy"):
        ExitCalibration("exit", 0.5, 0.1, 0.2)  # type: ignore[arg-type]


def test_model_costs_validation(tiny_costs: ModelCosts) -> None:
    good = tiny_costs
    fields = {name: getattr(good, name) for name in good.__dataclass_fields__}
    bad_cases: list[dict[str, Any]] = [
        {"cuts": (0, 0, 1)},
        {"codecs": ()},
        {"head_ms": (0.0, 1.0)},
        {"tail_ms": (0.0, -1.0, 1.0)},
        {"nbytes": ((1, 2), (3, 4))},
        {"encode_ms": ((0, 0), (0, 0), (0,))},
        {"decode_ms": ((0, math.inf), (0, 0), (0, 0))},
        {"device_full_ms": math.nan},
        {"exits": (ExitCalibration(ExitPolicy(7, "max_softmax", 0.9), 0.1, 0.1, 0.1),)},
        {"cuts": (EDGE_ONLY_CUT, -1, 1)},
    ]
    for change in bad_cases:
        with pytest.raises(ConfigError):
            ModelCosts(**{**fields, **change})
    # an uncalibrated (cut, codec) is inf: allowed, never chosen under a finite budget
    ModelCosts(**{**fields, "accuracy_drop": ((0, math.inf), (0, 0.2), (0, 0.1))})
    with pytest.raises(ConfigError, match="not in the model"):
        good.position(5)


def _profile(full: float, cuts: list[tuple[str, float, float, int]]) -> Profile:
    return Profile(
        model_id="ab" * 32,
        threads=1,
        batch=1,
        repeats=5,
        full_ms=full,
        cuts=tuple(CutProfile(i, n, h, t, b) for i, (n, h, t, b) in enumerate(cuts)),
    )


def test_from_profiles_takes_device_heads_and_edge_tails() -> None:
    device = _profile(20.0, [("conv", 5.0, 15.0, 4_000_000), ("fc", 19.0, 1.0, 400)])
    edge = _profile(2.0, [("conv", 0.5, 1.5, 4_000_000), ("fc", 1.9, 0.1, 400)])
    costs = ModelCosts.from_profiles(
        device,
        edge,
        input_bytes=1_000_000,
        codecs=("float32", "int8+zstd"),
        byte_ratio={"float32": 1.0, "int8+zstd": 0.2},
        codec_ms_per_mb={"float32": (0.0, 0.0), "int8": (1.0, 0.5)},
        accuracy_drop={(0, "int8+zstd"): 0.1, (1, "int8+zstd"): None},
        nbytes={(1, "int8+zstd"): 123.0},
    )
    assert costs.cuts == (EDGE_ONLY_CUT, 0, 1)
    assert costs.head_ms == (0.0, 5.0, 19.0)
    assert costs.tail_ms == (2.0, 1.5, 0.1)
    assert costs.device_full_ms == 20.0
    assert costs.nbytes == ((1e6, 2e5), (4e6, 8e5), (400.0, 123.0))  # measured beats ratio
    assert costs.encode_ms[1] == (0.0, 4.0)  # 4 MB at 1 ms per MB (by the base codec)
    assert costs.decode_ms[1] == (0.0, 2.0)
    assert costs.accuracy_drop == ((0.0, math.inf), (0.0, 0.1), (0.0, math.inf))
    other = _profile(2.0, [("conv", 0.5, 1.5, 4_000_000)])
    with pytest.raises(ConfigError, match="different models"):
        ModelCosts.from_profiles(device, other)
    with pytest.raises(ConfigError, match="codec"):
        ModelCosts.from_profiles(device, edge, codecs=("int2",))
    without_input = ModelCosts.from_profiles(device, edge)
    assert EDGE_ONLY_CUT not in without_input.cuts


def test_edge_estimate_validation() -> None:
    for change in (
        {"intercept_ms": -1.0},
        {"ms_per_byte": math.inf},
        {"speed_factor": math.nan},
        {"var_coeffs": (1.0, 2.0)},
        {"var_coeffs": (1.0, 2.0, math.nan)},
    ):
        with pytest.raises(ConfigError):
            EdgeEstimate(**{"intercept_ms": 1.0, "ms_per_byte": 0.0, **change})  # type: ignore[arg-type]
    assert np.isclose(EDGE.network_ms(100), 6.0)
