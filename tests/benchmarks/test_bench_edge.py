"""Smoke test of ``secure-ci bench edge``: it runs at its smallest size and reports every
figure (sane values only: no wall-clock thresholds; the targets are checked by reading it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from secure_ci.cli._bench import load

COSTS = {
    "tls",
    "framing",
    "cbor",
    "signature_verify",
    "signature_sign",
    "journal_fsync",
    "output_commitment",
    "thread_handoff",
    "device_sign_request",
    "device_verify_result",
}
OVERHEAD = {
    "latency_ms_plain",
    "latency_ms_secure",
    "latency_ms_durable",
    "latency_ratio",
    "durable_latency_ratio",
    "measured_overhead_us",
    "measured_durable_overhead_us",
    "throughput_plain",
    "throughput_secure",
    "throughput_ratio",
}


def _positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_edge_runs_quick_and_reports_every_figure(tmp_path: Path) -> None:
    bench = load("edge")
    result = bench.run(quick=True)
    json.loads(json.dumps(result))  # JSON-ready as it is
    assert result["quick"] is True
    assert set(result["setups"]) == {"tail_20ms", "tail_1ms"}
    for name, figures in result["setups"].items():
        assert figures["setup"]["batched"], name
        assert _positive(figures["tail_ms"])
        overhead = figures["overhead"]
        assert set(overhead) == OVERHEAD
        measured = {"measured_overhead_us", "measured_durable_overhead_us"}
        assert all(_positive(overhead[k]) for k in OVERHEAD - measured)
        assert all(math.isfinite(overhead[k]) for k in measured)
        assert overhead["latency_ratio"] == pytest.approx(
            overhead["latency_ms_secure"] / overhead["latency_ms_plain"]
        )
        costs = figures["breakdown_us"]
        assert set(costs) == COSTS
        assert all(_positive(part["us"]) for part in costs.values())
        assert _positive(costs["journal_fsync"]["per_request_in_batch_of_32_us"])
        assert [row["devices"] for row in figures["batching"]] == [1, 32]
        for row in figures["batching"]:
            assert _positive(row["requests_per_s"])
            assert _positive(row["offline_rows_per_s"])
            assert row["ratio_to_offline"] == pytest.approx(
                row["requests_per_s"] / row["offline_rows_per_s"]
            )
        assert 0 < figures["handshake_ms"]["p50"] <= figures["handshake_ms"]["p95"]
    png = tmp_path / "edge.png"
    bench.plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
