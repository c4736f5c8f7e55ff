from __future__ import annotations

from typer.testing import CliRunner

from secure_ci.cli import app

runner = CliRunner()


def test_help_lists_every_command_group() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("partition", "attest", "edge", "device", "ledger", "audit", "bench", "demo"):
        assert group in result.output


def test_unknown_benchmark_is_a_usage_error() -> None:
    result = runner.invoke(app, ["bench", "no-such-benchmark"])
    assert result.exit_code != 0
