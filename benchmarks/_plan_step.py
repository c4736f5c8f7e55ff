"""The plan benchmark's bandwidth step (a square wave 20 <-> 2 Mbit/s) and noise test.

**Setup.** The step must move the oracle, or it shows nothing. With every codec admitted,
the resnet18's int4 input (1.5 kB) costs 0.6 ms at 20 Mbit/s and 6 ms at 2: edge-only int4
wins at both rates. So the step's deployment admits only a lossless codec (``step_codecs``,
float32, as an accuracy budget of zero would: the 12 kB input costs 5 ms at 20 Mbit/s and
49 ms at 2), and the device slowdown is chosen by measurement in the same run: at slowdown
1 the oracle measures every configuration at both rates; each one's latency at slowdown s
is that plus (s - 1) x its profiled device time (what the emulated device sleeps); the
slowdown is the one that maximises the smaller of the two contrasts (the old rate's oracle
against the new rate's, at the new rate), and then both oracles are measured again at that
slowdown. ``oracle_differs`` records whether they differ.

**Square wave.** The planner (probing every ``step_probe_s``) settles at 20 Mbit/s, then the
link flips every ``step_tasks`` requests. Per step: ``requests_to_switch`` (1 = the first
request after the step was already a new plan), ``requests_until_within_10pct`` and
``seconds_until_within_10pct`` (the first request whose configuration's oracle latency at
the new rate is within 10 % of the new oracle's; seconds from the step to its end), and
the same judged by that request's own measured latency. The load on a shared machine drifts
within a minute, so after the wave every plan it used is measured again beside each rate's
best (:func:`_plan_oracle.confirm`) and the tables it is judged by hold both passes.

**Noise.** A stationary link at each rate whose bandwidth is redrawn uniformly within
±20 % every ``NOISE_PERIOD_S``: a fresh planner warms up, then plan changes are counted
over ``noise_seconds``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from _plan_oracle import Oracle, PlannerRun, confirm, measure_oracle, shape, with_codecs
from _plan_rig import Device, ModelRig

from secure_ci.plan import ModelCosts
from secure_ci.testing import LinkShaper

RATES = (20.0, 2.0)
SLOWDOWNS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)
NOISE = 0.2
NOISE_PERIOD_S = 0.1
WITHIN = 1.1


def _at(oracle: Oracle, slowdown: float) -> list[float]:
    """Each configuration's latency predicted at ``slowdown`` from its runs at slowdown 1
    (the device sleeps ``slowdown - 1`` times the profiled time of its part)."""
    profiled = oracle.space.device_ms
    return [statistics.median(lat) + (slowdown - 1.0) * float(profiled[i])
            for i, lat in enumerate(oracle.samples)]  # fmt: skip


def _contrast(fast: list[float], slow: list[float]) -> float:
    """How much each rate's oracle beats the other's at that rate (the smaller of the two)."""
    bf, bs = (
        min(range(len(fast)), key=fast.__getitem__),
        min(range(len(slow)), key=slow.__getitem__),
    )
    return min(slow[bf] / slow[bs], fast[bs] / fast[bf])


def _belief(run: PlannerRun) -> dict[str, Any]:
    """What the planner believed when it decided: its prediction, link and device speed."""
    link, decision = run.edge.link, run.last
    return {
        "predicted_ms": None if decision is None else round(decision.expected_ms, 3),
        "reason": None if decision is None else decision.reason,
        "uplink_estimate_mbps": round(8e-3 / link.ms_per_byte, 3) if link.ms_per_byte else None,
        "intercept_ms": round(link.intercept_ms, 3),
        "device_speed": round(run.speed.factor, 3),
        "link_steps": link.steps,
    }


async def _choose_slowdown(
    rig: ModelRig, device: Device, shaper: LinkShaper, costs: ModelCosts, rtt: float, reps: int
) -> tuple[float, dict[str, Any]]:
    device.slowdown = 1.0
    found: dict[float, Oracle] = {}
    for mbps in RATES:
        shape(shaper, mbps, rtt)
        found[mbps] = await measure_oracle(rig, device, reps, costs=costs, seed=int(mbps))
    scores = {s: _contrast(_at(found[RATES[0]], s), _at(found[RATES[1]], s)) for s in SLOWDOWNS}
    labels = [str(c) for c in found[RATES[0]].space.configurations]
    measured = {
        str(mbps): {
            label: [round(statistics.median(lat), 3), round(statistics.median(dev), 3)]
            for label, lat, dev in zip(labels, o.samples, o.device_samples, strict=True)
        }
        for mbps, o in found.items()
    }
    return max(scores, key=scores.__getitem__), {
        "contrast": {str(s): round(v, 3) for s, v in scores.items()},
        "at_slowdown_1_median_latency_and_device_ms": measured,
    }


async def step(rig: ModelRig, device: Device, shaper: LinkShaper, size: Any) -> dict[str, Any]:
    """Square wave 20 <-> 2 Mbit/s on ``rig`` restricted to ``size.step_codecs``."""
    rtt, costs = size.step_rtt_ms, with_codecs(rig.costs, size.step_codecs)
    slowdown, calibration = await _choose_slowdown(rig, device, shaper, costs, rtt, size.reps)
    device.slowdown = slowdown
    oracles: dict[float, Oracle] = {}
    for mbps in RATES:
        shape(shaper, mbps, rtt)
        oracles[mbps] = await measure_oracle(
            rig, device, size.reps, costs=costs, seed=7 + int(mbps)
        )
    labels = [str(c) for c in PlannerRun(rig, device, 1.0, costs).planner.configurations]
    shape(shaper, RATES[0], rtt)
    run = PlannerRun(rig, device, size.step_probe_s, costs)
    await run.probe(force=True)
    for _ in range(size.warmup + size.step_tasks):
        await run.task()
        await asyncio.sleep(size.step_interval_s)
    raw: list[tuple[float, int, list[dict[str, Any]]]] = []  # (rate, plan before, requests)
    origin = time.monotonic()
    for half in range(size.step_half_periods):
        mbps = RATES[(half + 1) % 2]
        before = run.planner.space.configurations.index(run.planner.current)
        shape(shaper, mbps, rtt)
        stepped_at = time.monotonic()
        requests = []
        for _ in range(size.step_tasks):
            index, switched, m = await run.task()
            done = time.monotonic()
            requests.append({"index": index, "switched": switched, "latency_ms": m.latency_ms,
                             "since_step_s": done - stepped_at, "t_s": done - origin,
                             **_belief(run)})  # fmt: skip
            await asyncio.sleep(size.step_interval_s)
        raw.append((mbps, before, requests))
    # the load drifts: the plans the wave used are measured again beside each rate's best
    for mbps in RATES:
        shape(shaper, mbps, rtt)
        used = {
            i
            for rate, before, rs in raw
            if rate == mbps
            for i in (before, *(r["index"] for r in rs))
        }
        await confirm(oracles[mbps], used)
    tables = {m: o.table for m, o in oracles.items()}
    best = {m: o.best for m, o in oracles.items()}
    timeline: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    for mbps, before, requests in raw:
        table, target = tables[mbps], tables[mbps][best[mbps]]
        first_switch = back = measured_back = None
        back_s = measured_back_s = None
        for n, r in enumerate(requests, start=1):
            index = r["index"]
            timeline.append({
                "t_s": round(r["t_s"], 4), "mbps": mbps, "plan": labels[index],
                "latency_ms": round(r["latency_ms"], 3), "plan_oracle_ms": round(table[index], 3),
                "oracle_ms": round(target, 3), "oracle": labels[best[mbps]],
                **{k: v for k, v in r.items()
                   if k not in {"index", "switched", "latency_ms", "since_step_s", "t_s"}},
            })  # fmt: skip
            if r["switched"] and first_switch is None:
                first_switch = n
            if back is None and table[index] <= WITHIN * target:
                back, back_s = n, r["since_step_s"]
            if measured_back is None and r["latency_ms"] <= WITHIN * target:
                measured_back, measured_back_s = n, r["since_step_s"]
        final = requests[-1]["index"]
        steps.append({
            "to_mbps": mbps, "requests_to_switch": first_switch,
            "old_plan_regret": table[before] / target - 1.0,
            "switch_needed": table[before] > WITHIN * target,
            "requests_until_within_10pct": back,
            "seconds_until_within_10pct": None if back_s is None else round(back_s, 4),
            "measured_requests_until_within_10pct": measured_back,
            "measured_seconds_until_within_10pct": (
                None if measured_back_s is None else round(measured_back_s, 4)),
            "final": labels[final], "final_regret": table[final] / target - 1.0,
            "oracle": labels[best[mbps]], "final_is_oracle": final == best[mbps],
        })  # fmt: skip
    needed = [s for s in steps if s["switch_needed"]]
    backs = [s["requests_until_within_10pct"] for s in steps]
    seconds = [s["seconds_until_within_10pct"] for s in steps]
    return {
        "rates_mbps": list(RATES), "rtt_ms": rtt, "slowdown": slowdown,
        "codecs": list(size.step_codecs), "slowdown_choice": calibration,
        "interval_s": size.step_interval_s, "probe_s": size.step_probe_s,
        "tasks_per_step": size.step_tasks,
        "oracle": {str(m): labels[i] for m, i in best.items()},
        "oracle_ms": {str(m): round(tables[m][i], 3) for m, i in best.items()},
        "oracle_differs": best[RATES[0]] != best[RATES[1]],
        "oracle_contrast": round(_contrast(tables[RATES[0]], tables[RATES[1]]), 3),
        "oracle_noise_regret": {str(m): o.noise_regret for m, o in oracles.items()},
        "steps": steps,
        "steps_needing_a_switch": len(needed),
        "max_requests_to_switch": (
            None if not needed or any(s["requests_to_switch"] is None for s in needed)
            else max(s["requests_to_switch"] for s in needed)
        ),
        "max_requests_until_within_10pct": None if None in backs else max(backs),
        "max_seconds_until_within_10pct": None if None in seconds else max(seconds),
        "timeline": timeline,
        "_cpu": run.cpu_ms,
    }  # fmt: skip


async def noise(
    rig: ModelRig, device: Device, shaper: LinkShaper, size: Any, slowdown: float
) -> dict[str, Any]:
    """Plan changes on a stationary link with ±20 % bandwidth noise, at each rate."""
    rtt, costs = size.step_rtt_ms, with_codecs(rig.costs, size.step_codecs)
    device.slowdown = slowdown
    rng = random.Random(12)
    rates: list[dict[str, Any]] = []
    cpu: list[float] = []
    for mbps in RATES:
        shape(shaper, mbps, rtt)
        run = PlannerRun(rig, device, size.step_probe_s, costs)
        await run.probe(force=True)
        stop = asyncio.Event()

        async def jitter(mbps: float = mbps, stop: asyncio.Event = stop) -> None:
            while not stop.is_set():
                shape(shaper, mbps * rng.uniform(1.0 - NOISE, 1.0 + NOISE), rtt)
                await asyncio.sleep(NOISE_PERIOD_S)

        noisy = asyncio.create_task(jitter())
        try:
            for _ in range(size.warmup + 2):
                await run.task()
                await asyncio.sleep(size.step_interval_s)
            before, plans = run.planner.switches, set()
            start = time.monotonic()
            requests = 0
            while time.monotonic() - start < size.noise_seconds:
                index, _, _ = await run.task()
                plans.add(str(run.planner.configurations[index]))
                requests += 1
                await asyncio.sleep(size.step_interval_s)
            seconds = time.monotonic() - start
        finally:
            stop.set()
            await noisy
        changes = run.planner.switches - before
        cpu.extend(run.cpu_ms)
        rates.append({
            "mbps": mbps, "seconds": round(seconds, 3), "requests": requests,
            "plan_changes": changes, "changes_per_10s": round(changes * 10.0 / seconds, 3),
            "plans": sorted(plans), "link_steps_detected": run.edge.link.steps,
        })  # fmt: skip
    return {
        "noise": NOISE, "redraw_s": NOISE_PERIOD_S, "slowdown": slowdown, "rtt_ms": rtt,
        "rates": rates,
        "max_changes_per_10s": max(r["changes_per_10s"] for r in rates),
        "_cpu": cpu,
    }  # fmt: skip


def plot_step(ax_latency: Any, ax_plan: Any, step: dict[str, Any]) -> None:
    """Latency and chosen configuration against time beside the oracle's."""
    rows = step["timeline"]
    t = [r["t_s"] for r in rows]
    # request i is drawn over (end of request i - 1, end of request i]: what served then
    x = [0.0, *t]

    def pre(key: str) -> list[Any]:
        return [rows[0][key], *(r[key] for r in rows)]

    for ax in (ax_latency, ax_plan):
        for start, r in zip(x, rows, strict=False):
            if r["mbps"] == RATES[1]:
                ax.axvspan(start, r["t_s"], color="0.9", lw=0)
    ax_latency.plot(t, [r["latency_ms"] for r in rows], "o", ms=3, label="planner, measured")
    ax_latency.step(x, pre("plan_oracle_ms"), where="pre",
                    label="planner's choice, oracle-measured")  # fmt: skip
    ax_latency.step(x, pre("oracle_ms"), where="pre", ls="--", color="k",
                    label="oracle")  # fmt: skip
    ax_latency.set_xlabel(f"time (s); grey: {RATES[1]:g} Mbit/s, white: {RATES[0]:g} Mbit/s")
    ax_latency.set_ylabel("latency (ms)")
    ax_latency.set_title(
        f"bandwidth step ({step['model']}, {step['slowdown']:g}x, {step['rtt_ms']:g} ms, "
        f"{'/'.join(step['codecs'])})"
    )
    ax_latency.legend(loc="upper right", fontsize=8)
    names = sorted({r["plan"] for r in rows} | {r["oracle"] for r in rows})
    ax_plan.step(x, [names.index(p) for p in pre("plan")], where="pre", lw=2, label="planner")
    ax_plan.step(x, [names.index(p) for p in pre("oracle")], where="pre", ls="--", color="k",
                 label="oracle")  # fmt: skip
    ax_plan.set_yticks(range(len(names)), names, fontsize=7)
    ax_plan.set_xlabel("time (s)")
    ax_plan.set_title("chosen configuration")
    ax_plan.legend(loc="upper right", fontsize=8)
