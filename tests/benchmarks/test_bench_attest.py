"""Smoke test of ``secure-ci bench attest`` at its smallest size: the JSON's keys and that its
figures are sane (finite, positive, in range); the targets are read from the JSON, never
asserted here, and no wall-clock threshold."""

from __future__ import annotations

from typing import Any

import pytest
from _smoke import Smoke, check_percentiles


def _check_attest(result: dict[str, Any]) -> None:
    assert result["size"] == "smoke"
    for key in ("verify_dev_ms", "verify_intel_sample_ms", "qvl_only_ms", "ratls_cert_verify_ms"):
        check_percentiles(result[key])
    mutations = result["mutations"]
    assert mutations["accepted"] == 0  # no mutated quote is ever a forgery
    assert mutations["crashed"] == 0
    assert mutations["tried"] == 70
    assert 0 < result["quote_bytes"] < result["evidence_bytes"] <= 64 * 1024
    assert isinstance(result["meets_targets"], bool)


@pytest.mark.slow
def test_bench_attest_smoke(bench_smoke: Smoke) -> None:
    _check_attest(bench_smoke("attest"))
