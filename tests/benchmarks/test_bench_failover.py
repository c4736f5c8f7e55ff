"""Smoke test of ``secure-ci bench failover``: through the command line at its smallest size;
every figure is there and sane, nothing is lost or accepted twice. No wall-clock threshold:
detection times and ratios are read from the JSON, not asserted here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from secure_ci.cli import app

runner = CliRunner()


def _sane(figures: dict[str, Any]) -> None:
    """Percentile figures: counted, and ordered when there are any."""
    assert figures["n"] >= 0
    if figures["n"]:
        assert 0 <= figures["p50"] <= figures["p95"] <= figures["max"]
        assert math.isfinite(figures["max"])


def _check_chaos(chaos: dict[str, Any]) -> None:
    assert chaos["tasks"] == 40
    assert chaos["lost"] == 0  # every task answered, and as the model on the device answers
    assert chaos["duplicates"] == 0  # one accepted receipt per task id
    journal = chaos["journal"]
    assert journal["duplicates"] == 0
    assert journal["accepted_not_journalled"] == 0
    assert journal["unfinished"] == 0
    assert journal["answered_receipts"] >= journal["accepted_receipts"]
    assert chaos["faults"].get("kill", 0) >= 1  # the stream outlived at least one kill
    assert set(chaos["faults"]) <= {"kill", "stop", "cut", "freeze"}
    assert chaos["failovers"] == sum(chaos["failover_outcomes"].values())
    assert chaos["failovers"] >= chaos["failed_over_tasks"]
    assert chaos["head_runs_max"] == 1  # no task's head ran twice
    if chaos["failed_over_tasks"]:
        assert chaos["no_recompute_share"] == 1.0
    for phase in ("baseline", "chaos"):
        figures = chaos[phase]
        assert figures["tasks"] == sum(figures["modes"].values())
        assert figures["tasks_per_s"] > 0
        _sane(figures["latency_ms"])
    assert chaos["throughput_ratio"] == pytest.approx(
        chaos["chaos"]["tasks_per_s"] / chaos["baseline"]["tasks_per_s"], rel=1e-3
    )
    assert chaos["latency_p50_ratio"] > 0
    detect = chaos["crash_detect_ms"]
    for key in ("first_reaction", "first_failed_attempt", "session_failed"):
        _sane(detect[key])
    _sane(detect["failed_attempt_duration_ms"])
    for key in ("first_failed_attempt", "session_failed"):
        _sane(detect["from_kill_signal"][key])
    breakdown = detect["breakdown"]
    for key in ("kill_to_death", "kill_to_reaped", "kill_to_socket_closed",
                "close_relayed_to_device", "device_reaction", "loop_stall_max"):  # fmt: skip
        _sane(breakdown[key])
    assert set(breakdown["closes"]) <= {"eof", "reset"}
    kills = [f for f in chaos["fault_log"] if f["kind"] == "kill"]
    for f in kills:  # a death is seen (socket closed or reaped), never before the signal
        assert f["kill_to_death_ms"] is not None
        assert f["kill_to_death_ms"] >= 0
    hang = chaos["hang_detect"]
    _sane(hang["timeout_attempt_ms"])
    _sane(hang["adaptive_timeout_ms"])
    if hang["timeout_attempt_ms"]["n"]:
        assert hang["ms_over_timeout_max"] >= 1.0  # a timeout never fires early
    for fault in chaos["fault_log"]:
        assert fault["start_s"] <= fault["end_s"]
    assert len(chaos["timeline"]) == 40


def _check_offline(offline: dict[str, Any]) -> None:
    assert offline["lost"] == 0
    assert offline["wrong"] == 0
    assert offline["journal_unfinished_at_end"] == 0
    assert offline["offline_tasks"] >= 1
    assert set(offline["offline_modes"]) <= {"device", "local-tail"}  # no edge to go to
    assert offline["offline_over_deadline"] <= offline["offline_tasks"]
    assert offline["resumed"] == offline["unfinished_at_device_kill"]
    assert offline["after_resume_tasks"] == 10
    assert offline["tasks_begun_before_device_kill"] >= 10
    for key in ("edges_restart_s", "device_start_s", "resume_s", "edges_back_to_synced_s"):
        assert offline[key] >= 0
    assert offline["edges_back_to_synced_s"] == pytest.approx(
        offline["device_start_s"] + offline["resume_s"], abs=0.5
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)  # five edge process starts: minutes on a loaded 2-core machine
def test_bench_failover_smoke(tmp_path: Path) -> None:
    json_path, png = tmp_path / "failover.json", tmp_path / "failover.png"
    result = runner.invoke(
        app, ["bench", "failover", "--size", "smoke", "--json", str(json_path), "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(json_path.read_text())
    assert figures["run"]["size"] == "smoke"
    assert figures["size"] == "smoke"
    assert figures["lost"] == 0
    assert figures["duplicates"] == 0
    ledger = figures["ledger"]
    assert ledger["lost"] == 0
    assert ledger["tasks"] > 0
    assert ledger["audit"]["findings"] == 0
    assert ledger["audit"]["receipts"] == ledger["audit"]["receipts_audited"]
    moved = ledger["reassignments"]
    assert moved["invisible"] == 0
    assert (
        moved["anchored_by_first_edge"] + moved["request_challenged"]
        == (moved["reassigned_attempts"])
    )
    assert figures["ledger_covered"] is (moved["reassigned_attempts"] > 0)
    assert figures["setup"]["edges"] == 3
    _check_chaos(figures["chaos"])
    _check_offline(figures["offline"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") >= 600
