"""What every benchmark shares: each has a smoke test of its own
(``tests/benchmarks/test_bench_NAME.py``, at ``--size smoke``), and ``bench``'s usage errors."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.cli._bench import available

TESTS = Path(__file__).resolve().parent
runner = CliRunner()


def test_every_benchmark_is_smoked() -> None:
    """Every benchmark has a smoke test in its own tests/benchmarks file."""
    own_files = {p.stem.removeprefix("test_bench_") for p in TESTS.glob("test_bench_*.py")}
    assert set(available()) <= own_files


def test_quick_and_size_disagreeing_is_a_usage_error() -> None:
    result = runner.invoke(app, ["bench", "attest", "--quick", "--size", "full"])
    assert result.exit_code != 0
    result = runner.invoke(app, ["bench", "attest", "--size", "huge"])
    assert result.exit_code != 0
