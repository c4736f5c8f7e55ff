"""Helpers of the benchmarks' smoke tests (the ``bench_smoke`` fixture is in conftest)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

Smoke = Callable[[str], dict[str, Any]]


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_percentiles(figures: dict[str, Any]) -> None:
    assert positive(figures["p50"])
    assert figures["p50"] <= figures["p95"]


def check_run_record(record: dict[str, Any], name: str) -> None:
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
