"""Smoke test of ``secure-ci bench partition`` at its smallest size: the JSON's keys and that its
figures are sane (finite, positive, in range); the targets are read from the JSON, never
asserted here, and no wall-clock threshold."""

from __future__ import annotations

from typing import Any

import pytest
from _smoke import Smoke, positive


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
        assert positive(row["encode_decode_ms_per_mb"])
        if row["model"] == "digits_cnn":
            assert -100 <= row["accuracy_drop_pt"] <= 100
        else:
            assert row["accuracy_drop_pt"] is None
    speed = result["codec_speed"]
    assert speed["shape"] == [1, 64, 56, 56]
    assert speed["float32_bytes"] == 4 * 64 * 56 * 56
    assert speed["threads"] == 1
    assert positive(speed["memcpy_gb_s"])
    assert set(speed["codecs"]) == {"float16", "int8", "int4"}
    for codec, figures in speed["codecs"].items():
        for key in ("encode_ms", "decode_ms", "gb_s", "cpu_gb_s", "best_gb_s", "vs_memcpy"):
            assert positive(figures[key]), (codec, key)
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
    assert all(positive(s) for s in result["analysis_seconds"].values())
    assert 0.5 < result["digits_test_accuracy"] <= 1


@pytest.mark.slow
def test_bench_partition_smoke(bench_smoke: Smoke) -> None:
    _check_partition(bench_smoke("partition"))
