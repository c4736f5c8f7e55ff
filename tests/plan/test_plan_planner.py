"""The planner: exhaustive search, constraints, hysteresis, explanations."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import ConfigError
from secure_ci.partition import ExitPolicy
from secure_ci.plan import (
    DEVICE_ONLY_CUT,
    EDGE_ONLY_CUT,
    Configuration,
    EdgeEstimate,
    ExitCalibration,
    ModelCosts,
    Planner,
    predict,
)


def two_way() -> ModelCosts:
    """Only device-only (10 ms x device speed) and edge-only (network + 1 ms)."""
    return ModelCosts(
        cuts=(EDGE_ONLY_CUT,),
        codecs=("float32",),
        head_ms=(0.0,),
        tail_ms=(1.0,),
        device_full_ms=10.0,
        nbytes=((1000.0,),),
        encode_ms=((0.0,),),
        decode_ms=((0.0,),),
        accuracy_drop=((0.0,),),
    )


REMOTE_9 = {"e": EdgeEstimate(intercept_ms=8.0, ms_per_byte=0.0)}  # edge-only: 9 ms
LOCAL = Configuration(None, DEVICE_ONLY_CUT, None)
REMOTE = Configuration("e", EDGE_ONLY_CUT, "float32")


def test_search_by_hand(tiny_costs: ModelCosts) -> None:
    planner = Planner(tiny_costs, ["e"], accuracy_budget=0.2, margin=0.0, patience=1)
    edge = EdgeEstimate(intercept_ms=5.0, ms_per_byte=0.01, queue_ms=0.0, speed_factor=1.0)
    # device speed 3: device-only 30; edge-only float32 5 + 10 + 10 = 25; cut 1 int8
    # 3 * 6.05 + 5.25 + 3.05 = 26.45; anything with the exit (drop 0.3) is over budget
    decision = planner.decide({"e": edge}, now=0.0, device_speed=3.0)
    assert decision.configuration == REMOTE
    assert decision.expected_ms == pytest.approx(25.0)
    assert (decision.reason, decision.switched, decision.feasible) == ("initial", True, True)
    # with a looser budget the exit at cut 0 pays: device-only with it costs
    # 0.4 * 3 * (2 + 1) + 0.6 * 3 * (10 + 1) = 3.6 + 19.8 = 23.4, but cut 1 int8 with it
    # 0.4 * 3 * (2 + 1) + 0.6 * (3 * (6 + 1 + 0.05) + 5.25 + 3.05) = 3.6 + 17.67 = 21.27
    # (drop 0.3 + 0.1; edge-only int8 at 17.6 would drop 0.5)
    again = planner.decide({"e": edge}, now=1.0, device_speed=3.0, accuracy_budget=0.4)
    assert again.configuration == Configuration("e", 1, "int8", tiny_costs.exits[0])
    assert again.expected_ms == pytest.approx(21.27)
    assert planner.switches == 1


def test_hysteresis_waits_for_a_lasting_gain() -> None:
    planner = Planner(two_way(), ["e"], margin=0.1, patience=3)
    assert planner.decide(REMOTE_9, now=0, device_speed=0.8).configuration == LOCAL  # 8 < 9
    # device-only now 12 vs 9: a 25 % gain, taken on the third decision in a row
    reasons = [planner.decide(REMOTE_9, now=k, device_speed=1.2).reason for k in (1, 2, 3)]
    assert reasons == ["hold", "hold", "gain"]
    assert planner.current == REMOTE
    # a 5 % gain (below the margin) never moves it
    for k in range(20):
        d = planner.decide(REMOTE_9, now=10 + k, device_speed=0.855)
        assert (d.configuration, d.reason) == (REMOTE, "hold")
    # an interrupted streak starts over
    planner.decide(REMOTE_9, now=40, device_speed=0.7)
    planner.decide(REMOTE_9, now=41, device_speed=0.7)
    planner.decide(REMOTE_9, now=42, device_speed=0.88)
    assert planner.decide(REMOTE_9, now=43, device_speed=0.7).reason == "hold"
    assert planner.switches == 1


def test_a_large_gain_is_taken_at_once() -> None:
    planner = Planner(two_way(), ["e"], margin=0.1, patience=3, jump=0.5)
    planner.decide(REMOTE_9, now=0, device_speed=0.5)
    d = planner.decide({"e": EdgeEstimate(intercept_ms=0.0, ms_per_byte=0.0)}, now=1)
    assert (d.configuration, d.reason, d.switched) == (REMOTE, "jump", True)


def test_deadline_and_unavailability_switch_at_once() -> None:
    planner = Planner(two_way(), ["e"], margin=0.5, patience=10, jump=0.9, deadline_z=0.0)
    planner.decide(REMOTE_9, now=0, device_speed=0.5)  # device-only, 5 ms
    d = planner.decide(REMOTE_9, now=1, device_speed=1.0, deadline_ms=9.5)
    assert (d.configuration, d.reason) == (REMOTE, "deadline")
    d = planner.decide({}, now=2, deadline_ms=9.5)  # the edge is gone
    assert (d.configuration, d.reason, d.feasible) == (LOCAL, "best-effort", False)
    # the edge is back but both miss: a best-effort plan moves only for a margin's worth
    late = {"e": EdgeEstimate(intercept_ms=9.0, ms_per_byte=0.0)}  # edge-only: 10 ms
    d = planner.decide(late, now=2.5, device_speed=1.05, deadline_ms=9.5)
    assert (d.configuration, d.reason, d.switched) == (LOCAL, "best-effort", False)
    d = planner.decide(late, now=2.6, device_speed=2.5, deadline_ms=9.5)
    assert (d.configuration, d.reason, d.switched) == (REMOTE, "best-effort", True)
    d = planner.decide(REMOTE_9, now=3, device_speed=0.5)
    assert (d.configuration, d.reason) == (REMOTE, "hold")  # no deadline: 5 vs 9 ms can wait
    planner.decide(REMOTE_9, now=4, device_speed=0.1)
    planner.reset()
    assert planner.current is None
    assert planner.decide(REMOTE_9, now=5).reason == "initial"


def test_unavailable_edge_and_tightened_budget_reasons(tiny_costs: ModelCosts) -> None:
    planner = Planner(tiny_costs, ["e", "f"], accuracy_budget=1.0, margin=0.1)
    fast = EdgeEstimate(intercept_ms=0.1, ms_per_byte=0.01)
    slow = EdgeEstimate(intercept_ms=50.0, ms_per_byte=0.01)
    first = planner.decide({"e": fast, "f": slow}, now=0, device_speed=5.0)
    assert first.configuration.edge == "e"
    d = planner.decide({"f": slow}, now=1, device_speed=5.0)
    assert (d.reason, d.configuration.edge) == ("unavailable", None)
    planner = Planner(tiny_costs, ["e"], accuracy_budget=1.0, margin=0.1)
    chosen = planner.decide({"e": fast}, now=0, device_speed=5.0).configuration
    assert (chosen.cut, chosen.codec) == (EDGE_ONLY_CUT, "int8")  # 12.7 ms, drop 0.5
    d = planner.decide({"e": fast}, now=1, device_speed=5.0, accuracy_budget=0.0)
    assert (d.reason, d.configuration) == ("accuracy", Configuration("e", EDGE_ONLY_CUT, "float32"))


def test_deadline_uses_the_predictive_spread() -> None:
    noisy = {"e": EdgeEstimate(intercept_ms=8.0, ms_per_byte=0.0, var_coeffs=(4.0, 0.0, 0.0))}
    for z, expected in ((0.0, REMOTE), (1.0, LOCAL)):
        planner = Planner(two_way(), ["e"], deadline_z=z)
        # device-only 10.5 > 10; edge-only 9 (+ z * 2 ms)
        d = planner.decide(noisy, now=0, device_speed=1.05, deadline_ms=10.0)
        assert d.configuration == expected


def test_explain_lists_the_best_few_with_their_components(tiny_costs: ModelCosts) -> None:
    planner = Planner(tiny_costs, ["e"], accuracy_budget=0.5, margin=0.0, patience=1)
    edge = EdgeEstimate(intercept_ms=5.0, ms_per_byte=0.01, queue_ms=2.0, speed_factor=2.0)
    decision = planner.decide({"e": edge}, now=0, device_speed=1.5, deadline_ms=30.0)
    explanation = decision.explain(top=3)
    assert explanation.chosen.configuration == decision.configuration
    assert len(explanation.rows) == 3
    costs = [row.expected_ms for row in explanation.rows]
    assert costs == sorted(costs)
    assert costs[0] == decision.expected_ms
    for row in explanation.rows:
        edge_or_none = None if row.configuration.edge is None else edge
        assert row.expected_ms == pytest.approx(
            predict(tiny_costs, row.configuration, edge_or_none, device_speed=1.5).expected_ms
        )
    text = str(explanation)
    assert text.startswith(f"chosen: {decision.configuration} (initial)")
    assert text.count("\n") == 1 + 3
    data = json.loads(json.dumps(explanation.to_json()))
    assert data["rows"][0]["configuration"] == str(decision.configuration)
    assert set(data["rows"][0]) >= {"network_ms", "queue_ms", "edge_ms", "p_exit", "feasible"}


def test_explain_shows_a_held_plan_even_when_it_is_not_among_the_best() -> None:
    planner = Planner(two_way(), ["e"], margin=0.1, patience=5)
    planner.decide(REMOTE_9, now=0, device_speed=0.5)
    held = planner.decide(REMOTE_9, now=1, device_speed=1.5)
    explanation = held.explain(top=1)
    assert [r.configuration for r in explanation.rows] == [REMOTE, LOCAL]
    assert str(explanation).splitlines()[-1].startswith("* device-only")


def test_planner_argument_validation() -> None:
    bad: list[dict[str, Any]] = [
        {"margin": 1.0},
        {"patience": 0},
        {"deadline_z": -1.0},
        {"accuracy_budget": -0.1},
        {"jump": 0.05},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            Planner(two_way(), ["e"], **kwargs)
    planner = Planner(two_way(), ["e"], device_only=False)
    with pytest.raises(ConfigError, match="no configuration is usable"):
        planner.decide({}, now=0)
    with pytest.raises(ConfigError, match="deadline"):
        planner.decide(REMOTE_9, now=0, deadline_ms=0.0)
    with pytest.raises(ConfigError, match="device_speed"):
        planner.decide(REMOTE_9, now=0, device_speed=0.0)


# -- property: with hysteresis off the choice is the argmin of the planner's own model --

_exits = st.lists(
    st.tuples(st.integers(0, 2), st.floats(0, 1), st.floats(0, 2), st.floats(0, 3)),
    max_size=3,
    unique_by=lambda e: e[0],
)
_estimate = st.builds(
    EdgeEstimate,
    intercept_ms=st.floats(0, 200),
    ms_per_byte=st.floats(0, 0.05),
    queue_ms=st.floats(0, 50),
    speed_factor=st.floats(0.1, 10),
    var_coeffs=st.tuples(st.floats(0, 100), st.floats(0, 0.01), st.floats(0, 1e-6)),
)


@st.composite
def model_costs(draw: st.DrawFn) -> ModelCosts:
    n = draw(st.integers(1, 3))
    codecs = ("float32", "int8", "int4")[: draw(st.integers(1, 3))]
    m = len(codecs)
    time = st.floats(0, 100)
    heads = sorted(draw(st.lists(time, min_size=n, max_size=n)))
    table = st.lists(st.lists(st.floats(0, 1e6), min_size=m, max_size=m), min_size=n, max_size=n)
    exits = tuple(
        ExitCalibration(ExitPolicy(cut % n, "max_softmax", 0.9), p, drop, head)
        for cut, p, drop, head in draw(_exits)
        if cut < n
    )
    return ModelCosts(
        cuts=tuple(range(n)),
        codecs=codecs,
        head_ms=tuple(heads),
        tail_ms=tuple(draw(st.lists(time, min_size=n, max_size=n))),
        device_full_ms=max(heads) + draw(time),
        nbytes=tuple(map(tuple, draw(table))),
        encode_ms=tuple(map(tuple, draw(table.map(lambda t: [[v / 1e5 for v in r] for r in t])))),
        decode_ms=tuple(map(tuple, draw(table.map(lambda t: [[v / 1e5 for v in r] for r in t])))),
        accuracy_drop=tuple(
            map(tuple, draw(table.map(lambda t: [[v / 3e5 for v in r] for r in t])))
        ),
        exits=exits,
    )


@settings(max_examples=150)
@given(
    costs=model_costs(),
    rounds=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(["a", "b", "c"]), _estimate, max_size=3),
            st.floats(0.1, 10),
            st.one_of(st.just(math.inf), st.floats(1, 500)),
            st.floats(0, 4),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_choice_is_the_argmin_of_the_model_without_hysteresis(
    costs: ModelCosts,
    rounds: list[tuple[dict[str, EdgeEstimate], float, float, float]],
) -> None:
    planner = Planner(costs, ["a", "b", "c"], margin=0.0, patience=1, deadline_z=1.0)
    for k, (estimates, speed, deadline, budget) in enumerate(rounds):
        decision = planner.decide(
            estimates, now=k, device_speed=speed, deadline_ms=deadline, accuracy_budget=budget
        )
        scored = []
        for config in planner.configurations:
            if config.edge is not None and config.edge not in estimates:
                continue
            edge = None if config.edge is None else estimates[config.edge]
            cost = predict(costs, config, edge, device_speed=speed)
            if cost.accuracy_drop <= budget:
                scored.append((cost, cost.full_path_ms + cost.std_ms <= deadline))
        feasible = [c.expected_ms for c, ok in scored if ok]
        chosen = predict(
            costs,
            decision.configuration,
            estimates.get(decision.configuration.edge or ""),
            device_speed=speed,
        )
        if feasible:
            assert decision.feasible
            assert chosen.expected_ms == pytest.approx(min(feasible), rel=1e-9, abs=1e-9)
        else:
            risk = min(c.full_path_ms + c.std_ms for c, _ in scored)
            assert not decision.feasible
            assert chosen.full_path_ms + chosen.std_ms == pytest.approx(risk, rel=1e-9, abs=1e-9)
