"""Shared by the benchmarks' smoke tests: run ``secure-ci bench NAME --size smoke`` through
the command line with ``--json`` and ``--plot``, check the run record and the plot, and hand
the figures to the test (which checks their keys and sanity, never a wall-clock threshold)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _smoke import Smoke, check_run_record
from typer.testing import CliRunner

from secure_ci.cli import app


@pytest.fixture
def bench_smoke(tmp_path: Path) -> Smoke:
    """``bench_smoke(name)``: the benchmark's figures at its smallest size (run record
    checked and removed, plot checked)."""

    def run(name: str) -> dict[str, Any]:
        json_path, png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
        result = CliRunner().invoke(
            app, ["bench", name, "--size", "smoke", "--json", str(json_path), "--plot", str(png)]
        )
        assert result.exit_code == 0, result.output
        figures: dict[str, Any] = json.loads(json_path.read_text())
        check_run_record(figures.pop("run"), name)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 600
        assert height >= 400
        return figures

    return run
