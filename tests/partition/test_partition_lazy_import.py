"""Reading a plan never imports torch; the runtime names load lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import secure_ci.partition as partition


def test_plan_half_does_not_import_torch() -> None:
    code = (
        "import secure_ci.partition as p, sys; "
        "plan = p.PartitionPlan(model_id='ab' * 32, cut=1, codec='int8'); "
        "p.PartitionPlan.decode(plan.encode()); p.Cut; p.TensorSpec; p.Profile; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_lazy_names_resolve_and_unknown_names_fail() -> None:
    from secure_ci.partition._partitioner import Partitioner

    assert partition.Partitioner is Partitioner
    assert "Partitioner" in dir(partition)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = partition.no_such_name
