"""A generic chart for benchmarks without their own ``plot``: throughput and latency figures.

The result's numeric leaves are found by their key paths and sorted by unit from the names
the benchmarks use: ``..._per_s`` / ``gb_s`` / ``throughput...`` are rates, ``..._ms``,
``..._us``, ``..._seconds`` are latencies and times, and a leaf without a unit of its own
(``p50``, a backend's name) takes the nearest parent's; ratios, counts and sizes are left
out. Each unit gets a panel of horizontal bars; the footer names the commit and the load.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

__all__ = ["figures", "plot_generic"]

MAX_BARS = 24
_UNITS = (
    ("throughput (/s)", re.compile(r"(per_s|per_cpu_s|rows_per_s|rps|throughput)(_|$)")),
    ("throughput (GB/s)", re.compile(r"gb_s(_|$)")),
    ("latency (ms)", re.compile(r"(^|_)ms(_|$)|latency_ms")),
    ("latency (µs)", re.compile(r"(^|_)us(_|$)")),
    ("time (s)", re.compile(r"(^|_)(seconds|s)$")),
)


def _leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(path, float(value))] if math.isfinite(value) else []
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if key != "run":  # the run record (commit, load) is the footer, not a figure
                out += _leaves(item, (*path, str(key)))
        return out
    if isinstance(value, list):
        out = []
        for index, item in enumerate(value):
            label = (item.get("name") or item.get("devices")) if isinstance(item, dict) else None
            out += _leaves(item, (*path, str(label if label is not None else index)))
        return out
    return []


_NOT_A_FIGURE = re.compile(r"ratio|share|fraction|count|bytes|records|samples|runs|rate$")


def _unit(path: tuple[str, ...]) -> str | None:
    """The unit the nearest key names, leaf first: ``latency_ms.p50`` is milliseconds,
    ``records_per_s.anvil`` a rate, ``latency_ms.records`` nothing (a count)."""
    keys = [k.lower() for k in reversed(path)]
    if not keys or _NOT_A_FIGURE.search(keys[0]):
        return None
    for key in keys:
        for unit, pattern in _UNITS:
            if pattern.search(key):
                return unit
    return None


def figures(result: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """``{unit: [(label, value), ...]}`` of the throughput and latency leaves of ``result``."""
    grouped: dict[str, list[tuple[str, float]]] = {}
    for path, value in _leaves(result):
        unit = _unit(path)
        if unit is not None:
            grouped.setdefault(unit, []).append((".".join(path), value))
    return {unit: rows[:MAX_BARS] for unit, rows in grouped.items()}


def plot_generic(name: str, result: dict[str, Any], path: Path) -> None:
    """Horizontal bars per unit; a note when the result holds no such figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = figures(result)
    heights = [max(2.0, 0.32 * len(rows) + 1.0) for rows in groups.values()] or [2.0]
    figure, axes = plt.subplots(len(heights), 1, figsize=(11, sum(heights) + 0.6), squeeze=False)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no throughput or latency figures", ha="center", va="center")
        axes[0][0].set_axis_off()
    for (unit, rows), (panel,) in zip(groups.items(), axes[: len(groups)], strict=True):
        labels, values = zip(*rows, strict=True)
        panel.barh(range(len(rows)), values, color="tab:blue")
        panel.set_yticks(range(len(rows)), labels, fontsize=8)
        panel.invert_yaxis()
        panel.set_xlabel(unit)
        for y, value in enumerate(values):
            panel.text(value, y, f" {value:.4g}", va="center", fontsize=7)
    run = result.get("run", {})
    commit = (run.get("commit") or "unknown")[:12] + (" (dirty)" if run.get("dirty") else "")
    figure.suptitle(f"secure-ci bench {name}")
    figure.text(
        0.01,
        0.005,
        f"commit {commit} · size {run.get('size')} · load {run.get('load_avg_start')} → "
        f"{run.get('load_avg_end')} on {run.get('cpus')} CPUs",
        fontsize=7,
    )
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
