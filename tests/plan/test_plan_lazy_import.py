"""Importing the planner pulls in neither torch nor any IO machinery."""

from __future__ import annotations

import subprocess
import sys


def test_plan_imports_no_torch_asyncio_or_socket() -> None:
    code = (
        "import sys, secure_ci.plan as p; "
        "costs = p.small_cnn_costs(); "
        "planner = p.Planner(costs, ['e']); "
        "d = planner.decide({'e': p.EdgeEstimator().estimate()}, now=0.0); str(d.explain()); "
        "bad = [m for m in ('torch', 'asyncio', 'socket', 'ssl') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
