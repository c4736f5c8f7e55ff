"""Smoke test of ``secure-ci bench ledger`` at its smallest size: the JSON's keys and that its
figures are sane (finite, positive, in range); the targets are read from the JSON, never
asserted here, and no wall-clock threshold."""

from __future__ import annotations

import math
from typing import Any

import pytest
from _smoke import Smoke, check_percentiles, positive


def _check_ledger(result: dict[str, Any]) -> None:
    assert result["size"] == "smoke"
    assert result["batch_size"] == 2000
    assert positive(result["records_per_s"]["inprocess"])
    assert positive(result["records_per_cpu_s"]["inprocess"])
    gas = result["gas_per_task"]
    assert 21_000 / 2000 < gas["prague"] < 21_000  # a batch amortises the base cost
    assert gas["cancun_derived"] <= gas["prague"]
    assert 50 < result["calldata_bytes_per_task"] < 400
    audit = result["audit_verify_ms"]
    assert (audit["records"], audit["samples"]) == (2000, 20)
    check_percentiles(audit)
    check_percentiles(audit["live_chain"])
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
        check_percentiles(connect[key])
    assert math.isfinite(connect["added_p50_ms"])  # a difference: noise may make it negative
    assert positive(connect["ratio"])
    assert connect["target_added_ms"] == 5.0


@pytest.mark.slow
def test_bench_ledger_smoke(bench_smoke: Smoke) -> None:
    _check_ledger(bench_smoke("ledger"))
