"""Smoke test of ``secure-ci bench plan`` (real models, edge, sessions and shaper; two cells).

Checks the JSON's shape and that its figures are sane and consistent with each other; the
targets are read from the JSON, never asserted here (and no wall-clock threshold).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.testing._netns import namespace_unavailable

runner = CliRunner()


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check_cell(cell: dict[str, Any]) -> None:
    for key in ("regret", "fixed_regret", "rtt_only_regret", "oracle_noise_regret"):
        assert _finite(cell[key])
        assert cell[key] >= -1e-9  # measured against the oracle's own table: never below it
    assert _finite(cell["realised_regret"])
    assert cell["oracle_ms"] > 0
    assert cell["planner_ms"] >= cell["oracle_ms"] - 1e-6
    assert cell["same_choice"] == (cell["planner"] == cell["oracle"])
    assert cell["measured_rtt_ms"] > 0
    assert cell["device_speed_estimate"] > 0
    assert 1 <= cell["contenders"] <= cell["oracle_runs"]


@pytest.mark.slow
def test_bench_plan_smoke(tmp_path: Path) -> None:
    json_path, png = tmp_path / "plan.json", tmp_path / "plan.png"
    result = runner.invoke(
        app, ["bench", "plan", "--size", "smoke", "--json", str(json_path), "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(json_path.read_text())
    assert figures["run"]["benchmark"] == "plan"
    assert figures["run"]["size"] == "smoke"
    assert figures["size"] == "smoke"
    grid = figures["grid"]
    cells_expected = len(grid["uplink_mbps"]) * len(grid["rtt_ms"]) * len(grid["slowdown"])
    assert set(figures["models"]) == {"digits_cnn"}
    model = figures["models"]["digits_cnn"]
    assert model["configurations"] == 1 + 4 * (1 + len(model["cuts"]))  # device, edge, cuts
    assert len(model["cells"]) == cells_expected
    for cell in model["cells"]:
        _check_cell(cell)
    summary = figures["summary"]
    assert summary["cells"] == cells_expected
    assert 0 <= summary["oracle_share"] <= 1
    assert summary["regret"]["p50"] <= summary["regret"]["p95"] <= summary["regret"]["max"]
    assert summary["oracle_noise_regret"]["p50"] >= 0
    cpu = summary["decision_cpu_ms"]
    assert cpu["decisions"] >= cells_expected * (grid["tasks"] + grid["warmup"])
    assert 0 < cpu["p50"] <= cpu["p99"]
    assert set(summary["meets_targets"]) == {
        "regret_p50", "regret_p95", "oracle_share", "step_requests", "noise_changes_per_10s",
        "decision_cpu_p99",
    }  # fmt: skip
    targets = figures["targets"]
    step = figures["step"]
    assert step["rates_mbps"] == [20.0, 2.0]
    assert len(step["steps"]) == 2
    assert step["steps_needing_a_switch"] == sum(s["switch_needed"] for s in step["steps"])
    assert step["oracle_differs"] == (step["oracle"]["20.0"] != step["oracle"]["2.0"])
    assert step["oracle_contrast"] >= 1.0
    assert str(step["slowdown"]) in step["slowdown_choice"]["contrast"]
    for s in step["steps"]:
        assert s["requests_to_switch"] is None or s["requests_to_switch"] >= 1
        back = s["requests_until_within_10pct"]
        assert back is None or 1 <= back <= step["tasks_per_step"]
        assert (back is None) == (s["seconds_until_within_10pct"] is None)
        assert s["old_plan_regret"] >= -1e-9
        assert s["final_regret"] >= -1e-9
    timeline = step["timeline"]
    assert len(timeline) == len(step["steps"]) * step["tasks_per_step"]
    assert [r["t_s"] for r in timeline] == sorted(r["t_s"] for r in timeline)
    assert all(r["plan_oracle_ms"] >= r["oracle_ms"] - 1e-6 for r in timeline)
    if not step["oracle_differs"]:  # a wave that does not move the oracle shows nothing
        assert summary["meets_targets"]["step_requests"] is False
    noise = figures["noise"]
    assert [r["mbps"] for r in noise["rates"]] == step["rates_mbps"]
    for r in noise["rates"]:
        assert r["requests"] >= 1
        assert r["seconds"] > 0
        assert r["plan_changes"] >= 0
    assert summary["meets_targets"]["noise_changes_per_10s"] == (
        noise["max_changes_per_10s"] <= targets["noise_changes_per_10s"]
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") >= 600
    assert int.from_bytes(data[20:24], "big") >= 400


@pytest.mark.slow
@pytest.mark.skipif(namespace_unavailable() is not None, reason="no network namespaces here")
def test_bench_plan_smoke_with_the_kernel_shaping_the_link(tmp_path: Path) -> None:
    """``--link kernel``: the command runs itself again under ``unshare -rn`` and tc tbf
    carries the rate (a separate process: the namespace is the child's, never this one's)."""
    out = tmp_path / "plan-kernel.json"
    done = subprocess.run(
        [sys.executable, "-m", "secure_ci", "bench", "plan", "--size", "smoke", "--link",
         "kernel", "--json", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["link"] == result["run"]["link"] == "kernel"
    cells = [c for m in result["models"].values() for c in m["cells"]]
    assert cells
    for cell in cells:
        _check_cell(cell)
