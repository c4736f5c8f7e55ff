"""The planner: per task, the cheapest configuration under an accuracy budget and a deadline.

Search is exhaustive and vectorised (:class:`~secure_ci.plan._table.ConfigurationSpace`):
every (edge, cut, codec, exit) is predicted at once from the current estimates. A
configuration is *feasible* when its edge is available, its accuracy drop is within the
budget, and its full path (the latency of a task that does not exit early) plus
``deadline_z`` predictive standard deviations meets the deadline.

Hysteresis keeps noise from flapping the plan: the planner moves off its current
configuration only when the best one is predicted cheaper by more than ``margin`` (a
fraction) on ``patience`` consecutive decisions, but at once when the current one is no
longer feasible (deadline broken, edge gone, budget tightened) or when the best one is
predicted cheaper by more than ``jump`` (default half: a step of the link, not noise), or by
more than ``margin`` right after an edge's step detector fired (its
:attr:`~secure_ci.plan.EdgeEstimate.link_steps` moved: the link changed, so the gain is not
noise and waiting ``patience`` decisions would only serve the old plan longer). With
``margin=0`` and ``patience=1`` every decision is the argmin of the model.

CPU per decision (numpy 2.4, one core of a shared AMD EPYC, ``timeit`` of ``decide`` on a
fixed snapshot): about 85 µs for the 101 configurations of ``small_cnn_costs()`` on one edge,
115 µs for 389 on four edges; ``explain()`` adds about 70 µs when it is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from secure_ci.exceptions import ConfigError
from secure_ci.plan._cost import Configuration, EdgeEstimate, ModelCosts
from secure_ci.plan._table import ConfigurationSpace, CostTable, Explanation

__all__ = ["Decision", "Planner"]


@dataclass(frozen=True)
class Decision:
    """The configuration for one task, and why.

    ``reason`` is one of ``initial``, ``hold``, ``gain`` (hysteresis let a cheaper plan in),
    ``jump`` (a much cheaper plan, taken at once), ``step`` (a cheaper plan by the margin,
    taken at once because an edge's link step detector fired since the last decision),
    ``deadline``, ``unavailable`` or ``accuracy`` (the current plan became infeasible), and
    ``best-effort`` (nothing meets the deadline: the one most likely to, i.e. the least
    full path plus ``deadline_z`` deviations; kept unless another is better by ``margin``).
    """

    configuration: Configuration
    index: int
    expected_ms: float
    full_path_ms: float
    switched: bool
    reason: str
    feasible: bool
    now: float
    table: CostTable = field(repr=False, compare=False)
    feasible_mask: np.ndarray = field(repr=False, compare=False)

    def explain(self, top: int = 5) -> Explanation:
        """The ``top`` cheapest feasible configurations (and the chosen one), by component."""
        order = np.argsort(np.where(self.feasible_mask, self.table.expected_ms, np.inf))
        picked = [int(i) for i in order[: max(1, top)]]
        if self.index not in picked:
            picked.append(self.index)
        return Explanation(
            chosen=self.table.breakdown(self.index),
            reason=self.reason,
            rows=tuple(self.table.breakdown(i) for i in picked),
            feasible=tuple(bool(self.feasible_mask[i]) for i in picked),
        )


class Planner:
    """Chooses (edge, cut, codec, exit) per task; holds the current plan between tasks."""

    def __init__(
        self,
        costs: ModelCosts,
        edges: Sequence[str],
        *,
        accuracy_budget: float = 1.0,
        margin: float = 0.1,
        patience: int = 3,
        jump: float = 0.5,
        deadline_z: float = 1.0,
        device_only: bool = True,
    ) -> None:
        if not (math.isfinite(margin) and 0.0 <= margin < 1.0):
            raise ConfigError(f"margin must be in [0, 1), got {margin}")
        if not (math.isfinite(jump) and margin <= jump):
            raise ConfigError(f"jump must be finite and >= margin, got {jump}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"patience must be an integer >= 1, got {patience!r}")
        if not (math.isfinite(deadline_z) and deadline_z >= 0):
            raise ConfigError(f"deadline_z must be finite and >= 0, got {deadline_z}")
        self.space = ConfigurationSpace(costs, edges, device_only=device_only)
        self.accuracy_budget = _budget(accuracy_budget)
        self.margin, self.patience, self.jump = margin, patience, jump
        self.deadline_z = deadline_z
        self._current: int | None = None
        self._streak = 0
        self._link_steps: dict[str, int] = {}
        self.switches = 0

    @property
    def configurations(self) -> tuple[Configuration, ...]:
        return self.space.configurations

    @property
    def current(self) -> Configuration | None:
        return None if self._current is None else self.space.configurations[self._current]

    def reset(self) -> None:
        """Forget the current plan (the next decision is ``initial``)."""
        self._current, self._streak = None, 0

    def decide(
        self,
        estimates: Mapping[str, EdgeEstimate],
        *,
        now: float,
        device_speed: float = 1.0,
        deadline_ms: float = math.inf,
        accuracy_budget: float | None = None,
    ) -> Decision:
        """Plan one task; edges absent from ``estimates`` are unavailable."""
        if math.isnan(deadline_ms) or deadline_ms <= 0:
            raise ConfigError(f"deadline_ms must be > 0, got {deadline_ms}")
        budget = self.accuracy_budget if accuracy_budget is None else _budget(accuracy_budget)
        table = self.space.evaluate(estimates, device_speed=device_speed)
        usable = table.available & (self.space.accuracy_drop <= budget)
        if not usable.any():
            raise ConfigError("no configuration is usable: no edge available within budget")
        risk = table.full_path_ms + self.deadline_z * table.std_ms
        feasible = usable & (risk <= deadline_ms)
        expected = table.expected_ms
        if feasible.any():
            best = int(np.argmin(np.where(feasible, expected, np.inf)))
        else:
            best = int(np.argmin(np.where(usable, risk, np.inf)))
        current = self._current
        stepped = self._link_stepped(estimates)
        if current is None:
            reason = "initial" if feasible[best] else "best-effort"
        elif not feasible[current]:
            if not feasible[best]:
                reason = "best-effort"
                if usable[current] and risk[best] >= (1.0 - self.margin) * risk[current]:
                    best = current  # nothing meets the deadline: do not flap among misses
            elif not table.available[current]:
                reason = "unavailable"
            elif not usable[current]:
                reason = "accuracy"
            else:
                reason = "deadline"
        elif expected[best] < (1.0 - self.jump) * expected[current]:
            reason = "jump"
        elif stepped and expected[best] < (1.0 - self.margin) * expected[current]:
            reason = "step"
        elif expected[best] < (1.0 - self.margin) * expected[current]:
            self._streak += 1
            reason = "gain" if self._streak >= self.patience else "hold"
        else:
            self._streak = 0
            reason = "hold"
        chosen = current if reason == "hold" and current is not None else best
        switched = chosen != current
        if switched:
            self._streak = 0
            self.switches += current is not None
        self._current = chosen
        return Decision(
            configuration=self.space.configurations[chosen],
            index=chosen,
            expected_ms=float(expected[chosen]),
            full_path_ms=float(table.full_path_ms[chosen]),
            switched=switched,
            reason=reason,
            feasible=bool(feasible[chosen]),
            now=now,
            table=table,
            feasible_mask=feasible,
        )

    def _link_stepped(self, estimates: Mapping[str, EdgeEstimate]) -> bool:
        """Whether any edge's link step count moved since it was last seen (and note it)."""
        stepped = False
        for name, estimate in estimates.items():
            seen = self._link_steps.get(name)
            stepped |= seen is not None and estimate.link_steps != seen
            self._link_steps[name] = estimate.link_steps
        return stepped


def _budget(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"accuracy budget must be a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"accuracy budget must be >= 0 points, got {value}")
    return float(value)
