"""The planner: which edge, cut, codec and exit each task uses (pure: data and numpy).

Nothing here imports torch, touches the network or reads a clock: costs come from a model
package's profiles and calibration (:class:`ModelCosts`), live estimates from the device's
own measurements (:class:`EdgeEstimator`, :class:`SpeedEstimator`), and every update and
decision takes ``now``. A device keeps one :class:`EdgeEstimator` per edge, feeds it each
completed task and ping, and asks :meth:`Planner.decide` before every task::

    planner = Planner(ModelCosts.from_profiles(device_profile, edge_profile, input_bytes=n),
                      ["edge-a", "edge-b"], accuracy_budget=0.5)
    decision = planner.decide({name: est.estimate() for name, est in estimators.items()},
                              now=clock(), device_speed=speed.factor, deadline_ms=80.0)
    print(decision.explain())

:func:`simulate` runs a planner against a known world and measures its regret against the
exhaustive oracle, :func:`regret_grid` over a grid of links and device speeds, and
:func:`small_cnn_costs` gives synthetic costs to run them on.
"""

from __future__ import annotations

from secure_ci.plan._cost import (
    DEVICE_ONLY_CUT,
    EDGE_ONLY_CUT,
    Configuration,
    CostBreakdown,
    EdgeEstimate,
    ExitCalibration,
    ModelCosts,
    predict,
)
from secure_ci.plan._estimators import (
    EdgeEstimator,
    Ewma,
    LinkEstimator,
    RttEstimator,
    SpeedEstimator,
)
from secure_ci.plan._planner import Decision, Planner
from secure_ci.plan._simulate import (
    SimulatedEdge,
    SimulationResult,
    constant,
    perturb_costs,
    regret_grid,
    simulate,
    small_cnn_costs,
)
from secure_ci.plan._table import ConfigurationSpace, CostTable, Explanation

__all__ = [
    "DEVICE_ONLY_CUT",
    "EDGE_ONLY_CUT",
    "Configuration",
    "ConfigurationSpace",
    "CostBreakdown",
    "CostTable",
    "Decision",
    "EdgeEstimate",
    "EdgeEstimator",
    "Ewma",
    "ExitCalibration",
    "Explanation",
    "LinkEstimator",
    "ModelCosts",
    "Planner",
    "RttEstimator",
    "SimulatedEdge",
    "SimulationResult",
    "SpeedEstimator",
    "constant",
    "perturb_costs",
    "predict",
    "regret_grid",
    "simulate",
    "small_cnn_costs",
]
