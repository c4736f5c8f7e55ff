"""`secure-ci demo`: the whole system on one machine, its tables and its JSON summary."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.demo._local import DEMO_CODECS, EXIT_MODE

# Shared with tests/zoo/test_digits.py so the full training runs once per machine.
SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"

runner = CliRunner()


def test_demo_runs_the_system_and_writes_a_summary(tmp_path: Path) -> None:
    out, png = tmp_path / "demo.json", tmp_path / "story.png"
    args = ["demo", "--tasks", "6", "--devices", "2", "--json", str(out)]
    args += ["--story-seconds", "3", "--plot", str(png)]
    result = runner.invoke(app, [*args, "--cache-dir", str(SHARED_CACHE)])
    assert result.exit_code == 0, result.output
    assert "int4+zstd" in result.output
    assert "verified by the auditor" in result.output
    assert f"plot of the story: {png}" in result.output.replace("\n", "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(out.read_text())
    _check_story(summary)
    assert [m["mode"] for m in summary["modes"]] == ["device-only", "edge-only", "collaborative"]
    assert [m["mode"] for m in summary["codecs"]] == [*DEMO_CODECS, EXIT_MODE]
    assert (summary["tasks_completed"], summary["tasks_failed"]) == (18, 0)
    by_mode = {m["mode"]: m for m in summary["modes"]}
    device_only = by_mode["device-only"]["accuracy"]
    for mode in ("edge-only", "collaborative"):
        assert by_mode[mode]["accuracy"] == device_only  # same predictions through the edge
    # int8 features of the pool1 boundary (8 KiB float32) are smaller than the 4 KiB input.
    assert by_mode["collaborative"]["bytes_per_task"] < by_mode["edge-only"]["bytes_per_task"]
    ledger = summary["ledger"]
    assert ledger["tasks_recorded"] == ledger["tasks_anchored"] == ledger["tasks_verified"] == 12
    assert ledger["receipts"] == 12
    assert ledger["contract"].startswith("0x")


def _check_story(summary: dict[str, Any]) -> None:
    """The planner story: it adapted, an edge died mid-stream, nothing was lost, all audited."""
    story = summary["story"]
    assert summary["tasks_lost"] == story["tasks_lost"] == 0
    assert summary["plan_switches"] == story["plan_switches"] == len(story["switches"]) >= 1
    assert summary["failovers"] == story["failovers"] >= 1  # the kill caught a frame in flight
    planner, fixed = story["trace"]["planner"], story["trace"]["fixed_split"]
    after = [e for e in planner if e["t"] > story["killed"]["t"]]
    assert after
    assert all(e["edge"] != story["killed"]["edge"] for e in after)
    moved = [e for e in planner if e["failovers"]]
    # the kill caught a frame; others may fail over too (a timeout on the slow link)
    assert any(e["attempts"][0][0] == story["killed"]["edge"] for e in moved)
    assert all(e["attempts"][-1][1] == "ok" for e in moved)
    assert {e["config"] for e in fixed} == {"pool1 int8"}
    for run in ("planner", "fixed_split"):  # int8 features rarely change a prediction
        assert story[run]["failed"] == 0
        assert story[run]["agreement"] >= 0.95
    audit = story["audit"]
    on_edges = sum(e["edge"] is not None for e in planner + fixed)
    assert audit["receipts"] == audit["receipts_audited"] == on_edges == story["tasks_on_edges"]
    assert audit["tasks_recorded"] == audit["tasks_anchored"] == audit["tasks_verified"]
    assert audit["tasks_anchored"] >= on_edges  # the killed edge may have journalled one more
    assert audit["findings"] == 0
    # every attempt the camera sent to the killed edge is on the ledger: anchored by that edge
    # from its journal, or challenged there with the camera's signed request
    moved_on_ledger = audit["reassignments"]
    assert moved_on_ledger["reassigned_attempts"] >= 1
    assert moved_on_ledger["invisible"] == 0
    assert (
        moved_on_ledger["anchored_by_first_edge"] + moved_on_ledger["request_challenged"]
        == moved_on_ledger["reassigned_attempts"]
    )


def test_demo_refuses_bad_arguments() -> None:
    result = runner.invoke(app, ["demo", "--cut", "nope", "--cache-dir", str(SHARED_CACHE)])
    assert result.exit_code != 0
    result = runner.invoke(app, ["demo", "--devices", "0", "--cache-dir", str(SHARED_CACHE)])
    assert result.exit_code != 0
