"""The planner's story (``secure-ci demo``, last part): adapt to the link, survive a crash.

A camera 100x slower than this machine (``slowdown``) classifies digits, ten frames a second,
through a fleet device (:func:`~secure_ci.device.open_device`) over two attested edges, each
behind an emulated link (:mod:`secure_ci.testing`'s shaper: a token bucket and a one-way
delay each way). The link steps down and up (``phases``: Mbit/s for so many seconds); the
device plans every frame from the model package's profile and its live estimates: it sends
the raw input (edge-only) while the link is fast and splits the model when it is slow.
Beside it, on the same link schedule, a camera with the fixed split the rest of the demo uses
(one edge, ``pool1`` with ``int8``) shows what a split chosen once costs. Midway through the
last phase the edge the planner is using is killed while a request is at it: the device
fails the frame over to the other edge with the features it already computed, and loses
none. At the end each edge anchors what it journalled, the auditor verifies every anchored
record, and every result a camera accepted is found among them.

The camera's plans are the offloading ones: edge-only, and splits at the cuts up to
``pool1`` with every codec. The fleet device learns the link only from the tasks it sends
(it does not probe an idle link yet), so device-only, an early exit or a cut whose features
are a few hundred bytes would hide the link's return to full speed from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from secure_ci.demo._story_ledger import reassignments_on_ledger
from secure_ci.demo._story_rig import (
    AUDIT_INDEX,
    StoryEdge,
    StoryWorld,
    audit_edges,
    open_story_world,
)
from secure_ci.demo._system import DEMO_MRENCLAVE, DEMO_MRSIGNER
from secure_ci.device import Session, TaskOutcome, TaskReceipt, open_device, open_session
from secure_ci.device._journal import DeviceJournal
from secure_ci.exceptions import ConfigError, PackageError, SecureCIError
from secure_ci.ledger import open_ledger
from secure_ci.package import ModelPackage, load_package, pack_bytes
from secure_ci.partition import PartitionPlan
from secure_ci.partition._guard import running
from secure_ci.plan import Configuration, Planner
from secure_ci.testing import Link

if TYPE_CHECKING:
    from secure_ci.zoo._train import TrainedDigits

__all__ = ["StoryConfig", "run_story", "story_package"]

Entry = dict[str, Any]
JOURNAL = "camera-journal.sqlite"
JUMP = 0.3
CALIBRATIONS = 10
ATTEMPT_FLOOR_S = 1.0
"""An attempt waits at least this long: a frame sent just before the link slows 200-fold
is slow, not lost (a crashed edge resets its connections, which the device sees at once)."""


@dataclass(frozen=True)
class StoryConfig:
    """The story's link schedule, device, baseline split and chain."""

    workdir: Path
    package: Path
    phases: tuple[tuple[float, float], ...] = ((20.0, 4.0), (0.1, 4.0), (20.0, 4.0))
    """(Mbit/s, seconds) of each step of the link, both directions."""
    delay_ms: float = 2.0
    """One-way delay of the link (the RTT is twice this)."""
    slowdown: float = 100.0
    fps: float = 10.0
    """Frames per second the camera takes (a frame waits while the one before runs)."""
    kill_at: float = 0.5
    """When the edge in use is killed, as a fraction of the last phase."""
    baseline_cut: str = "pool1"
    baseline_codec: str = "int8"
    rpc: str | None = None

    def __post_init__(self) -> None:
        if not self.phases or any(m <= 0 or s <= 0 for m, s in self.phases):
            raise ConfigError("the story needs phases of positive Mbit/s and seconds")
        if not (self.delay_ms >= 0 and self.slowdown >= 1 and 0 < self.kill_at < 1):
            raise ConfigError("delay >= 0, slowdown >= 1 and 0 < kill_at < 1 needed")
        if not 0 < self.fps <= 1000:
            raise ConfigError("fps must be in (0, 1000]")


def story_package(trained: TrainedDigits, cache_dir: Path) -> Path:
    """The trained digits CNN as a model package (profiled on this machine), cached in
    ``cache_dir`` under its weights' digest; repacked when the cached one does not load."""
    from secure_ci import __version__
    from secure_ci.zoo._digits import DIGITS_INPUT_SHAPE

    digest = hashlib.sha256(__version__.encode())
    for name, tensor in sorted(trained.model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    path = cache_dir / f"digits_cnn-{digest.hexdigest()[:16]}.scipkg"
    if path.exists():
        try:
            load_package(path)
            return path
        except PackageError:
            pass  # another version's format, or damaged: pack again
    x, y = trained.data.test_x[:64], trained.data.test_y[:64]
    data = pack_bytes(
        trained.model, architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE,
        calibration=(x, y), calibration_source="first 64 held-out digits", repeats=5,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".partial")
    scratch.write_bytes(data)
    scratch.replace(path)
    return path


def _link(mbps: float, config: StoryConfig) -> Link:
    """One direction of the link; a burst of one Ethernet frame, so that a frame's features
    take their time at the link's rate (a deep bucket would let them through at once)."""
    return Link.mbps(mbps, delay_ms=config.delay_ms, burst_bytes=1514)


def _timed(fn: Callable[[torch.Tensor], bytes], x: torch.Tensor) -> tuple[bytes, float]:
    start = time.perf_counter()
    out = fn(x)
    return out, time.perf_counter() - start


def _head_cuts(package: ModelPackage, last: str) -> tuple[int, ...]:
    """The camera's heads: the batchable cuts up to ``last``."""
    names = [c.name for c in package.cuts]
    if last not in names:
        raise ConfigError(f"unknown cut {last!r}; cuts: {', '.join(names)}")
    return tuple(c for c in package.batchable_cuts if c <= names.index(last))


def _label(package: ModelPackage, c: Configuration) -> str:
    if c.mode == "device":
        return "device-only"
    if c.mode == "edge":
        return f"edge-only {c.codec}"
    label = f"{package.cuts[c.cut].name} {c.codec}"
    return label if c.exit is None else f"{label} exit@{c.exit.policy.threshold:g}"


class _Frames:
    """Held-out digits, in a loop, and what the whole model answers for each."""

    def __init__(self, trained: TrainedDigits) -> None:
        self.x = trained.data.test_x
        with running(), torch.inference_mode():
            self.expected = trained.model(self.x).argmax(dim=1)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i % len(self.x)].unsqueeze(0)

    def agrees(self, i: int, output: Any) -> bool:
        logits = output if isinstance(output, torch.Tensor) else output[0]
        return int(logits.argmax()) == int(self.expected[i % len(self.x)])


async def _phases(
    world: StoryWorld,
    config: StoryConfig,
    task: Callable[[int], Awaitable[Entry]],
    at_kill: Callable[[float], Awaitable[None]] | None = None,
) -> list[Entry]:
    """Run ``task`` frame after frame while the link steps through ``config.phases``."""
    loop = asyncio.get_running_loop()
    start = end = loop.time()
    trace: list[Entry] = []
    killer = None
    if at_kill is not None:
        last = config.phases[-1][1]
        kill_s = sum(s for _, s in config.phases) - last + config.kill_at * last
        killer = loop.create_task(_after(start + kill_s, at_kill, start))
    try:
        for phase, (mbps, seconds) in enumerate(config.phases):
            world.shape(_link(mbps, config))
            end += seconds
            while loop.time() < end:
                # the camera's next frame (one it missed while busy is dropped)
                due = start + math.ceil((loop.time() - start) * config.fps) / config.fps
                if due >= end:
                    await asyncio.sleep(end - loop.time())
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                t = loop.time() - start
                entry = await task(len(trace))
                trace.append({"t": round(t, 4), "phase": phase, "mbps": mbps, **entry})
    except BaseException:
        if killer is not None:
            killer.cancel()
        raise
    if killer is not None:
        await killer
    return trace


async def _after(when: float, action: Callable[[float], Awaitable[None]], start: float) -> None:
    await asyncio.sleep(max(0.0, when - asyncio.get_running_loop().time()))
    await action(start)


async def _fixed_split(
    world: StoryWorld, config: StoryConfig, package: ModelPackage, frames: _Frames,
    receipts: list[TaskReceipt],
) -> list[Entry]:  # fmt: skip
    """The baseline: one edge, the split and codec fixed, the same slowed device."""
    cuts = {c.name: c.index for c in package.cuts}
    if config.baseline_cut not in cuts:
        raise ConfigError(f"unknown cut {config.baseline_cut!r}; cuts: {', '.join(cuts)}")
    plan = PartitionPlan(package.model_id_hex, cuts[config.baseline_cut], config.baseline_codec)
    label = f"{config.baseline_cut} {config.baseline_codec}"
    edge = world.edges[0]
    async with open_session(
        edge.address, policy=world.policy, collateral=world.pki.collateral,
        identity=world.devices[1], model=package.partitioner().model, plan=plan,
        example_input=frames[0], ledger_domain=world.ledger.domain, canonical=package.canonical,
    ) as session:  # fmt: skip

        async def task(i: int) -> Entry:
            return await _baseline_task(session, config, frames, receipts, i, label, edge.name)

        return await _phases(world, config, task)


async def _baseline_task(
    session: Session, config: StoryConfig, frames: _Frames, receipts: list[TaskReceipt], i: int,
    label: str, edge: str,
) -> Entry:  # fmt: skip
    start = time.perf_counter()
    payload, head = await asyncio.to_thread(_timed, session.encode_input, frames[i])
    await asyncio.sleep(head * (config.slowdown - 1))  # the slower camera's head
    try:
        output, receipt = await session.infer_encoded(payload)
    except SecureCIError as exc:
        return {"config": label, "edge": edge, "latency_ms": None, "error": str(exc)}
    receipts.append(receipt)
    ms = (time.perf_counter() - start) * 1e3
    return {"config": label, "edge": edge, "latency_ms": round(ms, 3),
            "agrees": frames.agrees(i, output), "failovers": 0}  # fmt: skip


async def _planned(
    world: StoryWorld, config: StoryConfig, package: ModelPackage, frames: _Frames,
    receipts: list[TaskReceipt], killed: list[Entry], failed_over: list[TaskOutcome],
) -> tuple[list[Entry], int, int]:  # fmt: skip
    """The fleet device over both edges; kills the edge in use midway through the last
    phase. The trace, the planner's own switch count and the journal's unfinished tasks."""
    by_address = {e.address: e for e in world.edges}
    with DeviceJournal.open(config.workdir / JOURNAL) as journal:
        async with open_device(
            [e.address for e in world.edges], package=package, identity=world.devices[0],
            policy=world.policy, collateral=world.pki.collateral, journal=journal,
            domain=world.ledger.domain, slowdown=config.slowdown,
            cuts=_head_cuts(package, config.baseline_cut), attempt_floor=ATTEMPT_FLOOR_S,
        ) as device:  # fmt: skip
            # offloading plans only (see the module docstring); a plan 30 % cheaper is taken at
            # once (open_device's default waits for half): the link's steps here are large
            costs = replace(device.planner.space.costs, exits=())
            device.planner = Planner(costs, device.edges, device_only=False, jump=JUMP)
            for cut in device.local.cuts:  # torch's first call of a head is slow: not timed
                for codec in costs.codecs:
                    await asyncio.to_thread(device.local.encode, (frames[0],), cut, codec)
            # the speed factor starts from one timed run, which a busy moment can make 10x
            # too slow; the estimate is an EWMA (alpha 0.2): CALIBRATIONS runs wash it out
            for _ in range(CALIBRATIONS):
                await device.calibrate()
            await device.wait_ready()

            async def task(i: int) -> Entry:
                outcome = await device.run(frames[i])
                if outcome.receipt is not None:
                    receipts.append(outcome.receipt)
                if outcome.failovers:
                    failed_over.append(outcome)
                return _entry(package, outcome, by_address, frames.agrees(i, outcome.output))

            async def kill(start: float) -> None:
                current = device.planner.current
                victim = by_address.get(current.edge or "") if current else None
                victim = victim or world.edges[0]
                mid_task = await victim.kill()
                t = round((victim.killed_at or start) - start, 4)
                killed.append({"edge": victim.name, "mid_task": mid_task, "t": t})

            trace = await _phases(world, config, task, kill)
            switches = device.planner.switches
        unfinished = len(journal.unfinished())
    return trace, switches, unfinished


def _entry(
    package: ModelPackage, o: TaskOutcome, edges: dict[str, StoryEdge], agrees: bool
) -> Entry:
    edge = edges[o.edge].name if o.edge in edges else None
    return {
        "config": _label(package, o.configuration),
        "mode": o.mode,
        "edge": edge,
        "latency_ms": round(o.latency_ms, 3),
        "agrees": agrees,
        "failovers": o.failovers,
        "attempts": [[edges[a.edge].name, a.outcome] for a in o.attempts if a.edge in edges],
    }


def _run_summary(trace: list[Entry], config: StoryConfig) -> dict[str, Any]:
    done = [e for e in trace if e["latency_ms"] is not None]
    per_phase = []
    for p, (mbps, _) in enumerate(config.phases):
        ms = [e["latency_ms"] for e in done if e["phase"] == p]
        p50 = round(statistics.median(ms), 3) if ms else None
        per_phase.append({"mbps": mbps, "tasks": len(ms), "latency_ms_p50": p50})
    return {
        "tasks": len(trace),
        "failed": len(trace) - len(done),
        "agreement": round(sum(e["agrees"] for e in done) / len(done), 4) if done else 0.0,
        "latency_ms_p50": round(statistics.median(e["latency_ms"] for e in done), 3)
        if done else None,
        "phases": per_phase,
        "configurations": dict(Counter(e["config"] for e in done).most_common()),
    }  # fmt: skip


def _switches(trace: list[Entry]) -> list[Entry]:
    """Where the chosen configuration (cut and codec, or edge-only) changed."""
    return [
        {"t": b["t"], "mbps": b["mbps"], "from": a["config"], "to": b["config"]}
        for a, b in itertools.pairwise(trace)
        if a["config"] != b["config"]
    ]


async def run_story(
    trained: TrainedDigits,
    config: StoryConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run both devices over the link schedule, kill an edge, audit; the summary (with the
    per-frame ``trace`` of each run)."""
    report = progress or (lambda _what: None)
    package = await asyncio.to_thread(load_package, config.package)
    frames = _Frames(trained)
    fast = _link(config.phases[0][0], config)
    report("story: two edges behind shaped links")
    async with (
        open_ledger(config.rpc or "inprocess") as ledger,
        open_story_world(
            ledger, config.workdir, config.package, package.model_id, edges=2, devices=2,
            link=fast, now=int(time.time()), mrenclave=DEMO_MRENCLAVE, mrsigner=DEMO_MRSIGNER,
        ) as world,
    ):  # fmt: skip
        receipts: list[list[TaskReceipt]] = [[], []]
        report("story: the fixed split, link stepping")
        baseline = await _fixed_split(world, config, package, frames, receipts[1])
        killed: list[Entry] = []
        failed_over: list[TaskOutcome] = []
        report("story: the planner, link stepping, an edge killed")
        trace, planner_switches, unfinished = await _planned(
            world, config, package, frames, receipts[0], killed, failed_over
        )
        report("story: anchoring")
        await world.anchor()
        report("story: audit")
        audit = await audit_edges(config.workdir, ledger, world.edges, receipts[0] + receipts[1])
        report("story: every reassignment on the ledger")
        with DeviceJournal.open(config.workdir / JOURNAL) as journal:
            audit["reassignments"] = await reassignments_on_ledger(
                ledger, config.workdir / AUDIT_INDEX,
                {e.address: e.identity.address for e in world.edges}, failed_over, journal,
                world.devices[0],
            )  # fmt: skip
    answered = [e for e in trace if e["edge"] is not None]
    lost = sum(e["latency_ms"] is None for e in trace) + unfinished
    return {
        "slowdown": config.slowdown,
        "rtt_ms": 2 * config.delay_ms,
        "link_mbps": [m for m, _ in config.phases],
        "phase_seconds": [s for _, s in config.phases],
        "planner": _run_summary(trace, config),
        "fixed_split": _run_summary(baseline, config),
        "plan_switches": len(_switches(trace)),
        "planner_switches": planner_switches,
        "switches": _switches(trace),
        "failovers": sum(e["failovers"] for e in trace),
        "failed_over_tasks": sum(e["failovers"] > 0 for e in trace),
        "killed": killed[0] if killed else None,
        "tasks_lost": lost,
        "tasks_on_edges": len(answered) + sum(e["latency_ms"] is not None for e in baseline),
        "audit": audit,
        "trace": {"planner": trace, "fixed_split": baseline},
    }
