"""`secure-ci demo`: head -> codec -> tail on the held-out digits, table and JSON summary."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.demo._local import DEMO_CODECS, EXIT_MODE, run_split_demo
from secure_ci.exceptions import ConfigError
from secure_ci.zoo._train import load_trained_digits

# Shared with tests/zoo/test_digits.py so the full training runs once per machine.
SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"

runner = CliRunner()


def test_demo_prints_a_table_and_writes_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    result = runner.invoke(
        app,
        [
            "demo",
            "--tasks",
            "6",
            "--devices",
            "2",
            "--json",
            str(out),
            "--cache-dir",
            str(SHARED_CACHE),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "pool1" in result.output
    assert "int4+zstd" in result.output
    summary = json.loads(out.read_text())
    modes = [m["mode"] for m in summary["modes"]]
    assert modes == [*DEMO_CODECS, EXIT_MODE]
    assert summary["tasks_completed"] == 6 * len(modes)
    assert summary["tasks_failed"] == 0
    assert summary["devices"] == 2
    by_mode = {m["mode"]: m for m in summary["modes"]}
    assert by_mode["float32"]["bytes_per_task"] > 4 * by_mode["int8"]["bytes_per_task"] * 0.9
    assert by_mode["int4"]["bytes_per_task"] < by_mode["int8"]["bytes_per_task"]
    for mode in summary["modes"]:
        assert {"mode", "latency_ms_p50", "bytes_per_task", "accuracy"} <= set(mode)
        assert 0.0 <= mode["accuracy"] <= 1.0


def test_demo_core_matches_the_model_on_float32() -> None:
    trained = load_trained_digits(SHARED_CACHE)
    summary = run_split_demo(trained, cut_name="relu2", modes=["float32"], tasks=40)
    (mode,) = summary["modes"]
    with torch.no_grad():
        predictions = trained.model(trained.data.test_x[:40]).argmax(dim=1)
    expected = float((predictions == trained.data.test_y[:40]).float().mean())
    assert mode["accuracy"] == pytest.approx(expected)
    assert mode["bytes_per_task"] > summary["float32_bytes"]


def test_demo_refuses_bad_arguments() -> None:
    trained = load_trained_digits(SHARED_CACHE)
    with pytest.raises(ConfigError, match="unknown cut"):
        run_split_demo(trained, cut_name="nope")
    with pytest.raises(ConfigError, match="at least 1"):
        run_split_demo(trained, tasks=0)
    with pytest.raises(ConfigError, match="no exit head"):
        run_split_demo(trained, cut_name="conv3", modes=["int8+exit"])
    result = runner.invoke(app, ["demo", "--cut", "nope", "--cache-dir", str(SHARED_CACHE)])
    assert result.exit_code != 0
