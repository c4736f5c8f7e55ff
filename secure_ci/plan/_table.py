"""Every configuration's predicted cost at once (numpy), and the explanation of a decision."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_ci.exceptions import ConfigError
from secure_ci.plan._cost import (
    DEVICE_ONLY_CUT,
    EDGE_ONLY_CUT,
    Configuration,
    CostBreakdown,
    EdgeEstimate,
    ModelCosts,
)

__all__ = ["ConfigurationSpace", "CostTable", "Explanation"]

Floats = npt.NDArray[np.float64]


def _enumerate(costs: ModelCosts, edges: Sequence[str], device_only: bool) -> list[Configuration]:
    exits = (None, *costs.exits)
    out = [Configuration(None, DEVICE_ONLY_CUT, None, ex) for ex in exits] if device_only else []
    for edge in edges:
        for cut in costs.cuts:
            for codec in costs.codecs:
                for ex in exits:
                    if ex is None or (cut != EDGE_ONLY_CUT and ex.policy.cut <= cut):
                        out.append(Configuration(edge, cut, codec, ex))
    return out


class ConfigurationSpace:
    """All configurations of one model over some edges, as static per-configuration arrays."""

    def __init__(self, costs: ModelCosts, edges: Sequence[str], *, device_only: bool = True):
        if len(set(edges)) != len(edges) or not all(isinstance(e, str) and e for e in edges):
            raise ConfigError("edges must be distinct non-empty names")
        self.costs = costs
        self.edges = tuple(edges)
        self.device_only = device_only
        self.configurations = tuple(_enumerate(costs, self.edges, device_only))
        if not self.configurations:
            raise ConfigError("no configuration: no edge and device-only disabled")
        head, tail = costs.head_ms, costs.tail_ms
        rows: list[tuple[float, ...]] = []
        for c in self.configurations:
            ex = c.exit
            exit_head = ex.head_ms if ex is not None else 0.0
            exit_path = head[costs.position(ex.policy.cut)] + exit_head if ex is not None else 0.0
            drop = ex.accuracy_drop if ex is not None else 0.0
            p = ex.p_exit if ex is not None else 0.0
            if c.edge is None or c.codec is None:
                rows.append((-1, costs.device_full_ms + exit_head, exit_path, p, 0, 0, drop))
                continue
            i, j = costs.position(c.cut), costs.codecs.index(c.codec)
            rows.append(
                (
                    self.edges.index(c.edge),
                    head[i] + exit_head + costs.encode_ms[i][j],
                    exit_path,
                    p,
                    costs.nbytes[i][j],
                    tail[i] + costs.decode_ms[i][j],
                    drop + costs.accuracy_drop[i][j],
                )
            )
        table = np.array(rows, dtype=np.float64)
        edge = table[:, 0].astype(np.intp)
        # configurations without an edge read a last, all-zero "edge" that is always there
        self.edge_index = np.where(edge < 0, len(self.edges), edge)
        self.device_ms, self.exit_ms, self.p_exit = table[:, 1], table[:, 2], table[:, 3]
        self.nbytes, self.edge_ms, self.accuracy_drop = table[:, 4], table[:, 5], table[:, 6]
        self.nbytes_sq = self.nbytes * self.nbytes

    def evaluate(
        self, estimates: Mapping[str, EdgeEstimate], *, device_speed: float = 1.0
    ) -> CostTable:
        """Predict every configuration; edges missing from ``estimates`` are unavailable."""
        if not (math.isfinite(device_speed) and device_speed > 0):
            raise ConfigError(f"device_speed must be finite and > 0, got {device_speed}")
        n = len(self.edges) + 1
        per_edge = np.zeros((8, n))
        per_edge[7, -1] = 1.0
        for k, name in enumerate(self.edges):
            est = estimates.get(name)
            if est is not None:
                c0, c1, c2 = est.var_coeffs
                per_edge[:, k] = (
                    est.intercept_ms, est.ms_per_byte, est.queue_ms, est.speed_factor,
                    c0 + est.queue_var, c1, c2, 1.0,
                )  # fmt: skip
        g = per_edge[:, self.edge_index]
        network = g[0] + self.nbytes * g[1]
        edge = g[3] * self.edge_ms
        full = device_speed * self.device_ms + network + g[2] + edge
        var = g[4] + g[5] * self.nbytes + g[6] * self.nbytes_sq
        var *= g[7]  # device-only: no network, no variance
        expected = self.p_exit * (device_speed * self.exit_ms) + (1.0 - self.p_exit) * full
        return CostTable(
            space=self,
            device_speed=device_speed,
            network_ms=network,
            queue_ms=g[2],
            edge_ms=edge,
            full_path_ms=full,
            expected_ms=expected,
            std_ms=np.sqrt(np.maximum(var, 0.0)),
            available=g[7] > 0.0,
        )


@dataclass(frozen=True, eq=False)
class CostTable:
    """Predicted components of every configuration of a :class:`ConfigurationSpace`."""

    space: ConfigurationSpace
    device_speed: float
    network_ms: Floats
    queue_ms: Floats
    edge_ms: Floats
    full_path_ms: Floats
    expected_ms: Floats
    std_ms: Floats
    available: npt.NDArray[np.bool_]

    def breakdown(self, index: int) -> CostBreakdown:
        s, d = self.space, self.device_speed
        return CostBreakdown(
            configuration=s.configurations[index],
            device_ms=d * float(s.device_ms[index]),
            p_exit=float(s.p_exit[index]),
            exit_path_ms=d * float(s.exit_ms[index]),
            nbytes=float(s.nbytes[index]),
            network_ms=float(self.network_ms[index]),
            queue_ms=float(self.queue_ms[index]),
            edge_ms=float(self.edge_ms[index]),
            full_path_ms=float(self.full_path_ms[index]),
            expected_ms=float(self.expected_ms[index]),
            std_ms=float(self.std_ms[index]),
            accuracy_drop=float(s.accuracy_drop[index]),
        )


@dataclass(frozen=True)
class Explanation:
    """Why a decision was taken: the best few configurations by predicted cost."""

    chosen: CostBreakdown
    reason: str
    rows: tuple[CostBreakdown, ...]
    feasible: tuple[bool, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "chosen": str(self.chosen.configuration),
            "reason": self.reason,
            "rows": [
                {**row.to_json(), "feasible": ok}
                for row, ok in zip(self.rows, self.feasible, strict=True)
            ],
        }

    def __str__(self) -> str:
        lines = [
            f"chosen: {self.chosen.configuration} ({self.reason}), "
            f"expected {self.chosen.expected_ms:.2f} ms",
            f"  {'configuration':<40} {'expect':>8} {'full':>8} {'device':>8} {'net':>8} "
            f"{'queue':>7} {'edge':>7} {'p_exit':>6} {'±std':>7} {'drop':>5}",
        ]
        for row, ok in zip(self.rows, self.feasible, strict=True):
            mark = "*" if row.configuration == self.chosen.configuration else " "
            note = "" if ok else "  (infeasible)"
            lines.append(
                f"{mark} {row.configuration!s:<40.40} {row.expected_ms:8.2f} "
                f"{row.full_path_ms:8.2f} {row.device_ms:8.2f} {row.network_ms:8.2f} "
                f"{row.queue_ms:7.2f} {row.edge_ms:7.2f} {row.p_exit:6.2f} {row.std_ms:7.2f} "
                f"{row.accuracy_drop:5.2f}{note}"
            )
        return "\n".join(lines)
