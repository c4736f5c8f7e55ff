"""`secure-ci bench`'s generic wrapping: the run record and the fallback plot apply to any
benchmark, including one that knows nothing of sizes or plots (as ``edge`` may not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_ci.cli import _bench, app
from secure_ci.cli._bench_plot import figures, plot_generic

runner = CliRunner()
TOY = """
import dataclasses

@dataclasses.dataclass(frozen=True)
class Row:  # a dataclass: the loader must register the module before running it
    devices: int
    requests_per_s: float

def run(*, quick):
    rows = [Row(1, 50.0), Row(32, 80.0)]
    return {
        "quick": quick,
        "batching": [dataclasses.asdict(r) for r in rows],
        "handshake_ms": {"p50": 6.0, "p95": 7.5, "runs": 40},
        "overhead": {"latency_ms_plain": 19.6, "latency_ratio": 1.04, "throughput_secure": 78.8},
        "payload_bytes": 4096,
    }
"""


@pytest.fixture
def toy_benchmarks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "toy.py").write_text(TOY)
    (tmp_path / "_helper.py").write_text("X = 1\n")  # private modules are not benchmarks
    monkeypatch.setattr(_bench, "BENCH_DIR", tmp_path)
    return tmp_path


def test_run_record_and_generic_plot_for_a_plain_benchmark(
    toy_benchmarks: Path, tmp_path: Path
) -> None:
    assert _bench.available() == ["toy"]
    out, png = tmp_path / "out" / "toy.json", tmp_path / "out" / "toy.png"
    result = runner.invoke(
        app, ["bench", "toy", "--size", "smoke", "--json", str(out), "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    figures_ = json.loads(out.read_text())
    assert figures_["quick"] is True  # smoke runs a size-less benchmark at quick
    record = figures_["run"]
    assert (record["benchmark"], record["size"]) == ("toy", "quick")
    assert set(record) >= {"commit", "dirty", "cpus", "load_avg_start", "load_avg_end"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = _bench.run_benchmark("toy", size="full")
    assert (full["quick"], full["run"]["size"]) == (False, "full")


def test_unknown_size_and_benchmark_are_config_errors(toy_benchmarks: Path) -> None:
    from secure_ci.exceptions import ConfigError

    with pytest.raises(ConfigError, match="unknown size"):
        _bench.run_benchmark("toy", size="huge")
    with pytest.raises(ConfigError, match="unknown benchmark"):
        _bench.run_benchmark("_helper")


def test_a_kernel_link_only_for_benchmarks_that_shape_one(toy_benchmarks: Path) -> None:
    from secure_ci.exceptions import ConfigError

    with pytest.raises(ConfigError, match="unknown link"):
        _bench.run_benchmark("toy", size="smoke", link="radio")
    with pytest.raises(ConfigError, match="shapes no link"):
        _bench.run_benchmark("toy", size="smoke", link="kernel")
    assert _bench.run_benchmark("toy", size="smoke")["run"]["link"] == "user"


def test_figures_sorts_rates_and_latencies_and_skips_the_rest() -> None:
    result = {
        "batching": [{"devices": 1, "requests_per_s": 50.0}, {"devices": 32, "requests_per_s": 80}],
        "handshake_ms": {"p50": 6.0, "p95": 7.5, "runs": 40},
        "overhead": {"latency_ms_plain": 19.6, "latency_ratio": 1.04, "throughput_secure": 78.8},
        "records_per_s": {"anvil": 14_000.0, "inprocess": None},
        "codec": {"int8": {"gb_s": 1.2, "vs_memcpy": 0.1}},
        "breakdown_us": {"tls": 12.0},
        "payload_bytes": 4096,
        "ok": True,
        "run": {"wall_seconds": 3.0},
    }
    assert figures(result) == {
        "throughput (/s)": [
            ("batching.1.requests_per_s", 50.0),
            ("batching.32.requests_per_s", 80.0),
            ("overhead.throughput_secure", 78.8),
            ("records_per_s.anvil", 14_000.0),
        ],
        "latency (ms)": [
            ("handshake_ms.p50", 6.0),
            ("handshake_ms.p95", 7.5),
            ("overhead.latency_ms_plain", 19.6),
        ],
        "throughput (GB/s)": [("codec.int8.gb_s", 1.2)],
        "latency (µs)": [("breakdown_us.tls", 12.0)],
    }


def test_generic_plot_without_figures_still_writes_a_png(tmp_path: Path) -> None:
    png = tmp_path / "empty.png"
    plot_generic("empty", {"count": 3, "run": {"commit": None}}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
