"""Small hand-checkable model costs shared by the planner tests."""

from __future__ import annotations

import pytest

from secure_ci.partition import ExitPolicy
from secure_ci.plan import EDGE_ONLY_CUT, ExitCalibration, ModelCosts

EXIT = ExitCalibration(
    ExitPolicy(0, "max_softmax", 0.9), p_exit=0.4, accuracy_drop=0.3, head_ms=1.0
)


def make_tiny_costs() -> ModelCosts:
    """Edge-only plus two cuts, two codecs, one exit; numbers easy to add up by hand."""
    return ModelCosts(
        cuts=(EDGE_ONLY_CUT, 0, 1),
        codecs=("float32", "int8"),
        head_ms=(0.0, 2.0, 6.0),
        tail_ms=(10.0, 8.0, 3.0),
        device_full_ms=10.0,
        nbytes=((1000, 250), (4000, 1000), (100, 25)),
        encode_ms=((0, 0.1), (0, 0.2), (0, 0.05)),
        decode_ms=((0, 0.1), (0, 0.1), (0, 0.05)),
        accuracy_drop=((0, 0.5), (0, 0.2), (0, 0.1)),
        exits=(EXIT,),
    )


@pytest.fixture
def tiny_costs() -> ModelCosts:
    return make_tiny_costs()
