"""`secure-ci demo`: the whole system on one machine, its tables and its JSON summary."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.demo._local import DEMO_CODECS, EXIT_MODE

# Shared with tests/zoo/test_digits.py so the full training runs once per machine.
SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"

runner = CliRunner()


def test_demo_runs_the_system_and_writes_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    args = ["demo", "--tasks", "6", "--devices", "2", "--json", str(out)]
    result = runner.invoke(app, [*args, "--cache-dir", str(SHARED_CACHE)])
    assert result.exit_code == 0, result.output
    assert "int4+zstd" in result.output
    assert "verified by the auditor" in result.output
    summary = json.loads(out.read_text())
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


def test_demo_refuses_bad_arguments() -> None:
    result = runner.invoke(app, ["demo", "--cut", "nope", "--cache-dir", str(SHARED_CACHE)])
    assert result.exit_code != 0
    result = runner.invoke(app, ["demo", "--devices", "0", "--cache-dir", str(SHARED_CACHE)])
    assert result.exit_code != 0
