"""`secure-ci bench plan`: the planner's regret against an exhaustive, measured oracle.

Everything that runs is real: zoo models in torch, one in-process edge (attested TLS 1.3,
signed requests and results, the tails in its worker thread), one device with a pre-opened
session per (cut, codec), and the link shaper of ``secure_ci.testing`` between them (token
bucket each way at the cell's rate, half the cell's RTT as one-way delay each way). The
device's slowdown is emulated: after running the head (and the encoder, or the whole model
for device-only) the device sleeps ``slowdown - 1`` times their profiled time.

In each cell of uplink x RTT x slowdown, the **oracle** measures every configuration (device-
only, edge-only and every kept cut, with every codec) and keeps the median latency of each;
its choice is the least. It screens every configuration, gives the contenders ``reps`` more
runs, and after the planner ran confirms the planner's choices beside its best and runners-
up with ``reps`` more, every pass interleaved in a shuffled order (``_plan_oracle``). The
**planner** (``secure_ci.plan.Planner``, fresh in each cell, fed like a device feeds it:
``EdgeEstimator.observe_result`` from each task's send-to-result time and the edge's compute
time, a ``SpeedEstimator`` from the device's own head
times, and probes: a smallest-payload task and a task sized by ``LinkEstimator.probe_bytes``
every ``probe_s`` seconds, not charged) then runs ``warmup + tasks`` real tasks; its regret is
the oracle's measured latency of what it chose, averaged over the tasks after warmup, over the
oracle's best, minus one (``realised_regret`` uses the planner's own latencies instead). Beside
it: a plan **fixed** once (the planner's choice at the end of the first cell) and an
**RTT-only** planner refreshed every 60 s (cells last ``CELL_SECONDS`` of simulated time; it
knows the RTT measured at its last refresh, assumes the link at the estimator's 10 Mbit/s
prior and the device at its profiled speed, like a ping-based router). The **bandwidth step**
runs a square wave 20 <-> 2 Mbit/s in a setup chosen (and checked) by measurement so that the
oracle differs between the rates, and counts requests until the plan changes and until the
latency is back within 10 % of the new oracle; the **noise** test counts plan changes on a
stationary link with ±20 % bandwidth noise (``_plan_step``).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import percentile
from _plan_oracle import PlannerRun, confirm, measure_oracle, shape
from _plan_rig import EDGE, Device, ModelRig, build_rig, open_edge_for
from _plan_step import noise, plot_step, step

from secure_ci.plan import EdgeEstimate, LinkEstimator, Planner
from secure_ci.testing import KernelShaper, LinkShaper, open_link_shaper

CELL_SECONDS = 20.0
RTT_ONLY_REFRESH_S = 60.0
TARGETS = {"regret_p50": 0.05, "regret_p95": 0.10, "oracle_share": 0.80, "step_requests": 3,
           "step_within_s": 1.0, "noise_changes_per_10s": 1.0,
           "decision_cpu_p99_ms": 1.0}  # fmt: skip


@dataclass(frozen=True)
class Size:
    models: tuple[str, ...]
    uplinks: tuple[float, ...]
    rtts: tuple[float, ...]
    slowdowns: tuple[float, ...]
    reps: int
    tasks: int
    warmup: int
    cut_count: int
    profile_repeats: int
    step_half_periods: int
    step_tasks: int
    probe_s: float = 0.5
    step_interval_s: float = 0.05
    step_model: str = "resnet18"  # the first model when this one is not in the run
    step_rtt_ms: float = 5.0
    step_codecs: tuple[str, ...] = ("float32",)
    step_probe_s: float = 0.1  # an idle device pings often; a probe precedes most requests
    noise_seconds: float = 12.0


SIZES = {
    "smoke": Size(("digits_cnn",), (2.0, 50.0), (5.0,), (10.0,), 2, 3, 1, 3, 3, 2, 3,
                  noise_seconds=1.0),
    "quick": Size(
        ("digits_cnn", "resnet18"), (0.5, 5.0, 50.0), (2.0, 20.0, 100.0), (1.0, 10.0),
        4, 8, 3, 7, 20, 6, 10,
    ),
    "full": Size(
        ("digits_cnn", "resnet18", "transformer_encoder"), (0.5, 2.0, 10.0, 100.0),
        (2.0, 20.0, 100.0), (1.0, 3.0, 10.0), 4, 12, 3, 9, 30, 6, 12,
    ),
}  # fmt: skip


def _rtt_only_choice(rig: ModelRig, rtt_ms: float) -> int:
    planner = Planner(rig.costs, [EDGE], margin=0.0, patience=1)
    prior = LinkEstimator()
    estimate = EdgeEstimate(intercept_ms=max(0.0, rtt_ms), ms_per_byte=prior.ms_per_byte)
    return planner.decide({EDGE: estimate}, now=0.0).index


async def _grid(rig: ModelRig, device: Device, shaper: LinkShaper, size: Size) -> dict[str, Any]:
    labels = [str(c) for c in Planner(rig.costs, [EDGE]).configurations]
    cells: list[dict[str, Any]] = []
    fixed: int | None = None
    rtt_only: int | None = None
    cpu: list[float] = []
    grid = [(u, r, s) for s in size.slowdowns for r in size.rtts for u in size.uplinks]
    for k, (mbps, rtt, slowdown) in enumerate(grid):
        shape(shaper, mbps, rtt)
        device.slowdown = slowdown
        print(f"plan: {rig.name} cell {k + 1}/{len(grid)}: {mbps:g} Mbit/s, {rtt:g} ms, "
              f"{slowdown:g}x", file=sys.stderr, flush=True)  # fmt: skip
        oracle = await measure_oracle(rig, device, size.reps, seed=k)
        run = PlannerRun(rig, device, size.probe_s)
        await run.probe(force=True)
        chosen, latencies = [], []
        for t in range(size.warmup + size.tasks):
            index, _, m = await run.task()
            if t >= size.warmup:
                chosen.append(index)
                latencies.append(m.latency_ms)
        cpu.extend(run.cpu_ms)
        await confirm(oracle, set(chosen))
        table, best = oracle.table, oracle.best
        final = chosen[-1]
        if fixed is None:
            fixed = final
        measured_rtt = statistics.median(run.pings)
        if rtt_only is None or (k * CELL_SECONDS) % RTT_ONLY_REFRESH_S < CELL_SECONDS:
            rtt_only = _rtt_only_choice(rig, measured_rtt)
        planner_ms = statistics.fmean(table[i] for i in chosen)
        cells.append({
            "uplink_mbps": mbps, "rtt_ms": rtt, "slowdown": slowdown,
            "oracle": labels[best], "oracle_ms": round(table[best], 3),
            "planner": labels[final], "planner_ms": round(planner_ms, 3),
            "regret": planner_ms / table[best] - 1.0,
            "realised_regret": statistics.median(latencies) / table[best] - 1.0,
            "same_choice": final == best,
            "oracle_noise_regret": oracle.noise_regret, "oracle_runs": oracle.runs,
            "contenders": len(oracle.contenders),
            "switches": run.planner.switches,
            "fixed": labels[fixed], "fixed_regret": table[fixed] / table[best] - 1.0,
            "rtt_only": labels[rtt_only], "rtt_only_regret": table[rtt_only] / table[best] - 1.0,
            "measured_rtt_ms": round(measured_rtt, 3),
            "device_speed_estimate": round(run.speed.factor, 3),
            "uplink_estimate_mbps": (round(8e-3 / run.edge.link.ms_per_byte, 3)
                                     if run.edge.link.ms_per_byte > 0 else None),
        })  # fmt: skip
    return {
        "configurations": len(labels),
        "cuts": list(rig.cuts),
        "profile_full_ms": round(rig.costs.device_full_ms, 4),
        "cells": cells,
        "summary": _summary(cells),
        "_cpu": cpu,
    }


def _summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float]:
        values = [c[key] for c in cells]
        return {"p50": percentile(values, 50), "p95": percentile(values, 95),
                "max": max(values), "mean": statistics.fmean(values)}  # fmt: skip

    return {
        "cells": len(cells),
        "regret": stats("regret"),
        "realised_regret": stats("realised_regret"),
        "oracle_share": statistics.fmean(float(c["same_choice"]) for c in cells),
        "within_5pct_share": statistics.fmean(float(c["regret"] <= 0.05) for c in cells),
        "fixed_regret": stats("fixed_regret"),
        "rtt_only_regret": stats("rtt_only_regret"),
        "oracle_noise_regret": stats("oracle_noise_regret")
        if all(math.isfinite(c["oracle_noise_regret"]) for c in cells)
        else None,
    }


async def _run(size: Size, link: str) -> dict[str, Any]:
    rigs = [
        await asyncio.to_thread(
            build_rig, name, cut_count=size.cut_count, repeats=size.profile_repeats
        )
        for name in size.models
    ]
    out: dict[str, Any] = {"models": {}}
    cpu: list[float] = []
    async with open_edge_for(rigs) as (port, enclave, identity), open_link_shaper(port) as inner:
        # kernel: tc tbf enforces the rate, the user-space shaper keeps only the delay
        shaper: Any = KernelShaper(inner) if link == "kernel" else inner
        device = Device(shaper.address, enclave, identity)
        try:
            for rig in rigs:
                await device.open_all(rig)
            for rig in rigs:
                result = await _grid(rig, device, shaper, size)
                cpu.extend(result.pop("_cpu"))
                out["models"][rig.name] = result
            stepped = next((r for r in rigs if r.name == size.step_model), rigs[0])
            wave = await step(stepped, device, shaper, size)
            cpu.extend(wave.pop("_cpu"))
            out["step"] = {"model": stepped.name, **wave}
            noisy = await noise(stepped, device, shaper, size, wave["slowdown"])
            cpu.extend(noisy.pop("_cpu"))
            out["noise"] = {"model": stepped.name, **noisy}
        finally:
            await device.aclose()
    cells = [c for m in out["models"].values() for c in m["cells"]]
    summary = _summary(cells)
    summary["decision_cpu_ms"] = {"p50": percentile(cpu, 50), "p99": percentile(cpu, 99),
                                  "decisions": len(cpu)}  # fmt: skip
    wave, limit = out["step"], TARGETS["step_requests"]
    switched = all(
        s["requests_to_switch"] is not None and s["requests_to_switch"] <= limit
        for s in wave["steps"] if s["switch_needed"]
    )  # fmt: skip
    back = all(
        s["requests_until_within_10pct"] is not None
        and (s["requests_until_within_10pct"] <= limit
             or s["seconds_until_within_10pct"] <= TARGETS["step_within_s"])
        for s in wave["steps"]
    )  # fmt: skip
    # a wave whose oracle does not move demonstrates nothing: it cannot meet the target
    step_ok = wave["oracle_differs"] and wave["steps_needing_a_switch"] > 0 and switched and back
    summary["meets_targets"] = {
        "regret_p50": summary["regret"]["p50"] <= TARGETS["regret_p50"],
        "regret_p95": summary["regret"]["p95"] <= TARGETS["regret_p95"],
        "oracle_share": summary["oracle_share"] >= TARGETS["oracle_share"],
        "step_requests": step_ok,
        "noise_changes_per_10s": out["noise"]["max_changes_per_10s"]
        <= TARGETS["noise_changes_per_10s"],
        "decision_cpu_p99": summary["decision_cpu_ms"]["p99"] <= TARGETS["decision_cpu_p99_ms"],
    }
    out["summary"] = summary
    out["targets"] = TARGETS
    return out


def run(*, quick: bool, size: str = "full", link: str = "user") -> dict[str, Any]:
    """The grid, the comparison policies and the bandwidth step at ``size``; ``link``
    "kernel" shapes the rate with tc tbf (inside a network namespace of its own)."""
    chosen = SIZES[size if size in SIZES else ("quick" if quick else "full")]
    grid = {"uplink_mbps": list(chosen.uplinks), "rtt_ms": list(chosen.rtts),
            "slowdown": list(chosen.slowdowns), "reps": chosen.reps, "tasks": chosen.tasks,
            "warmup": chosen.warmup, "cut_count": chosen.cut_count,
            "probe_s": chosen.probe_s, "cell_seconds_simulated": CELL_SECONDS}  # fmt: skip
    result = asyncio.run(_run(chosen, link))
    return {"size": size, "grid": grid, "link": link,
            "slowdown_emulation": "sleep (slowdown - 1) x the profiled head+encode "
            "(or whole-model) time after running it", **result}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for m in result["models"].values() for c in m["cells"]]
    models = list(result["models"].items())
    fig, axes = plt.subplots(
        2, 1 + len(models), figsize=(6.5 * (1 + len(models)), 11.0), dpi=100, squeeze=False
    )
    cdf = axes[0][0]
    for key, label, style in (
        ("regret", "planner", "-"),
        ("fixed_regret", "fixed once", "--"),
        ("rtt_only_regret", "RTT-only, 60 s", ":"),
        ("oracle_noise_regret", "oracle vs itself (noise)", "-."),
    ):
        values = sorted(max(c[key], 1e-4) for c in cells if math.isfinite(c[key]))
        if values:
            cdf.step(
                values,
                np.arange(1, len(values) + 1) / len(values),
                where="post",
                label=label,
                ls=style,
                lw=2 if label == "planner" else 1.5,
            )
    cdf.axvline(0.05, color="grey", ls=":", lw=1)
    cdf.axvline(0.10, color="grey", ls="--", lw=1)
    cdf.set_xscale("log")
    cdf.set_xlabel("regret vs measured oracle (latency / best - 1; floor 1e-4)")
    cdf.set_ylabel("fraction of cells")
    cdf.set_title("regret CDF over all cells")
    cdf.legend(loc="lower right")
    for heat, (name, model) in zip(axes[0][1:], models, strict=True):
        _heat(heat, fig, name, model["cells"])
    if result.get("step", {}).get("timeline"):
        plot_step(axes[1][0], axes[1][1], result["step"])
    for ax in axes[1][2 if result.get("step", {}).get("timeline") else 0 :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _heat(heat: Any, fig: Any, name: str, cells: list[dict[str, Any]]) -> None:
    rows = sorted({c["uplink_mbps"] for c in cells})
    cols = sorted({(c["slowdown"], c["rtt_ms"]) for c in cells})
    grid = np.full((len(rows), len(cols)), np.nan)
    for c in cells:
        grid[rows.index(c["uplink_mbps"]), cols.index((c["slowdown"], c["rtt_ms"]))] = c["regret"]
    image = heat.imshow(grid, cmap="viridis_r", vmin=0, vmax=0.2, aspect="auto", origin="lower")
    for c in cells:
        mark = "D" if c["oracle"] == "device-only" else ("E" if "edge-only" in c["oracle"] else "S")
        heat.text(
            cols.index((c["slowdown"], c["rtt_ms"])),
            rows.index(c["uplink_mbps"]),
            f"{mark}{'' if c['same_choice'] else '*'}\n{c['regret']:.0%}",
            ha="center",
            va="center",
            color="white" if c["regret"] > 0.1 else "black",
            fontsize=8,
        )
    heat.set_xticks(range(len(cols)), [f"{s:g}x\n{r:g}ms" for s, r in cols], fontsize=7)
    heat.set_yticks(range(len(rows)), [f"{u:g}" for u in rows])
    heat.set_xlabel("device slowdown / RTT")
    heat.set_ylabel("uplink Mbit/s")
    heat.set_title(f"{name}: regret (oracle D/E/S; * other choice)")
    fig.colorbar(image, ax=heat, label="regret")
