"""Smoke tests of ``secure-ci bench NAME`` for every benchmark but ``edge`` (its own file).

Each runs through the command line at its smallest size (``--size smoke``) with ``--json`` and
``--plot`` and checks the JSON's keys and that its figures are sane (finite, positive, in
range); never a wall-clock threshold: the targets are read from the JSON, not asserted here.
A new ``benchmarks/*.py`` without a smoke test fails :func:`test_every_benchmark_is_smoked`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.cli._bench import available

TESTS = Path(__file__).resolve().parent
runner = CliRunner()


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _percentiles(figures: dict[str, Any]) -> None:
    assert _positive(figures["p50"])
    assert figures["p50"] <= figures["p95"]


def _check_partition(result: dict[str, Any]) -> None:
    assert result["size"] == "smoke"
    rows = result["codecs"]
    assert {r["model"] for r in rows} >= {"digits_cnn", "resnet18"}
    for row in rows:
        assert set(row) == {
            "model", "cut", "codec", "float32_bytes", "bytes_ratio", "accuracy_drop_pt",
            "encode_decode_ms_per_mb",
        }  # fmt: skip
        assert 0 < row["bytes_ratio"] < 2
        assert _positive(row["encode_decode_ms_per_mb"])
        if row["model"] == "digits_cnn":
            assert -100 <= row["accuracy_drop_pt"] <= 100
        else:
            assert row["accuracy_drop_pt"] is None
    speed = result["codec_speed"]
    assert speed["shape"] == [1, 64, 56, 56]
    assert speed["float32_bytes"] == 4 * 64 * 56 * 56
    assert speed["threads"] == 1
    assert _positive(speed["memcpy_gb_s"])
    assert set(speed["codecs"]) == {"float16", "int8", "int4"}
    for codec, figures in speed["codecs"].items():
        for key in ("encode_ms", "decode_ms", "gb_s", "cpu_gb_s", "best_gb_s", "vs_memcpy"):
            assert _positive(figures[key]), (codec, key)
        assert figures["vs_memcpy"] == pytest.approx(
            figures["gb_s"] / speed["memcpy_gb_s"], rel=0.01
        )
    ratios = {c: f["bytes_ratio"] for c, f in speed["codecs"].items()}
    assert ratios["int4"] < ratios["int8"] < ratios["float16"] < 1
    assert isinstance(speed["meets_target"], bool)
    assert len(speed["sweep"]) == 1
    exit_ = result["early_exit"]
    assert 0 <= exit_["exit_rate"] <= 1
    assert exit_["device_compute_saved"] <= 1
    assert set(result["analysis_seconds"]) >= {"digits_cnn", "resnet18", "transformer_encoder"}
    assert all(_positive(s) for s in result["analysis_seconds"].values())
    assert 0.5 < result["digits_test_accuracy"] <= 1


def _check_attest(result: dict[str, Any]) -> None:
    assert result["size"] == "smoke"
    for key in ("verify_dev_ms", "verify_intel_sample_ms", "qvl_only_ms", "ratls_cert_verify_ms"):
        _percentiles(result[key])
    mutations = result["mutations"]
    assert mutations["accepted"] == 0  # no mutated quote is ever a forgery
    assert mutations["crashed"] == 0
    assert mutations["tried"] == 70
    assert 0 < result["quote_bytes"] < result["evidence_bytes"] <= 64 * 1024
    assert isinstance(result["meets_targets"], bool)


def _check_ledger(result: dict[str, Any]) -> None:
    assert result["size"] == "smoke"
    assert result["batch_size"] == 2000
    assert _positive(result["records_per_s"]["inprocess"])
    assert _positive(result["records_per_cpu_s"]["inprocess"])
    gas = result["gas_per_task"]
    assert 21_000 / 2000 < gas["prague"] < 21_000  # a batch amortises the base cost
    assert gas["cancun_derived"] <= gas["prague"]
    assert 50 < result["calldata_bytes_per_task"] < 400
    audit = result["audit_verify_ms"]
    assert (audit["records"], audit["samples"]) == (2000, 20)
    _percentiles(audit)
    _percentiles(audit["live_chain"])
    assert set(result["by_devices_per_batch"]) == {"16", "200", "1000", "2000"}
    integrity = result["integrity_gas"]
    fraud = integrity["fraud_proof_gas"]
    assert fraud["records"] == 2000
    assert 21_000 < fraud["truncated"] <= fraud["root_mismatch"] < 16_700_000  # EIP-7825 cap
    challenge = integrity["request_challenge_gas"]
    assert 21_000 < challenge["open"] < 500_000
    assert 21_000 < challenge["answer"] < 500_000
    assert challenge["proof_length"] == 11  # ceil(log2(2000)) siblings
    disputes = result["dispute_gas"]
    assert 21_000 < disputes["k2"] < disputes["k3"] < disputes["k8"] < 1_000_000
    assert (disputes["k2_dissenters"], disputes["k3_dissenters"], disputes["k8_dissenters"]) == (
        0,
        1,
        2,
    )
    governance = result["governance"]
    assert governance["backend"] in ("inprocess", "anvil")
    gas = governance["gas"]
    assert set(gas) == {
        "propose_release", "approve", "execute_release", "suspend", "propose_lift",
        "execute_lift", "lift", "propose_party", "execute_party",
    }  # fmt: skip
    assert all(21_000 < g < 1_000_000 for g in gas.values())
    assert gas["lift"] > gas["propose_lift"] + gas["execute_lift"]
    connect = governance["connect"]
    assert connect["sessions"] == 4
    for key in ("baseline_ms", "with_release_check_ms", "check_ms", "head_query_ms"):
        _percentiles(connect[key])
    assert math.isfinite(connect["added_p50_ms"])  # a difference: noise may make it negative
    assert _positive(connect["ratio"])
    assert connect["target_added_ms"] == 5.0


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "partition": _check_partition,
    "attest": _check_attest,
    "ledger": _check_ledger,
}


def _check_run_record(record: dict[str, Any], name: str) -> None:
    assert record["benchmark"] == name
    assert record["size"] == "smoke"
    assert record["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert record["dirty"] in (None, True, False)
    assert record["cpus"] >= 1
    for key in ("load_avg_start", "load_avg_end"):
        assert len(record[key]) == 3
        assert all(v >= 0 for v in record[key])
    assert record["wall_seconds"] >= 0
    assert record["versions"]["torch"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_benchmark_smoke(name: str, tmp_path: Path) -> None:
    json_path, png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    result = runner.invoke(
        app, ["bench", name, "--size", "smoke", "--json", str(json_path), "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(json_path.read_text())
    _check_run_record(figures.pop("run"), name)
    CHECKS[name](figures)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600
    assert height >= 400


def test_every_benchmark_is_smoked() -> None:
    """Every benchmark has a smoke test: here, or in its own tests/benchmarks file."""
    own_files = {p.stem.removeprefix("test_bench_") for p in TESTS.glob("test_bench_*.py")}
    assert set(available()) <= set(CHECKS) | own_files
    assert "edge" not in CHECKS  # edge's smoke test lives in test_bench_edge.py


def test_quick_and_size_disagreeing_is_a_usage_error() -> None:
    result = runner.invoke(app, ["bench", "attest", "--quick", "--size", "full"])
    assert result.exit_code != 0
    result = runner.invoke(app, ["bench", "attest", "--size", "huge"])
    assert result.exit_code != 0
