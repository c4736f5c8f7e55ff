"""A device over a fleet of edges: plans every task, fails over, keeps working offline.

::

    async with open_device(edges, package=package, identity=identity, policy=policy,
                           collateral=collateral, journal=journal) as device:
        y = await device.infer(x)
        ys = await device.infer_many(frames)
        device.last.decision.explain()   # why the last task ran where it ran

Each task is planned (:class:`~secure_ci.plan.Planner`) over every (edge, cut, codec) and
device-only, from the package's costs and live estimates fed by every completed task (the
edge reports its queue wait and compute time in each result). The encoded features are kept
until a verified result is accepted: when the edge crashes, hangs past an adaptive timeout,
refuses, or answers with a result that does not verify, the same signed-over features go to
the next edge (one task id across attempts; each attempt is its own request naming its
edge), and with no edge left the tail runs here, on those features: the head never runs
twice. Exactly one result is accepted per task; a verified result that arrives later is
journalled as ``superseded``. A :class:`~secure_ci.device._breaker.Breaker` per edge keeps a
failing edge out, backing off; sessions are reconnected in the background.

With a journal the device writes ahead: a task's inputs are on disk before any work, and its
outcome (every attempt, the accepted receipt) replaces them atomically, so after kill -9
:meth:`Device.resume` finishes what was left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import statistics
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from secure_ci.device._edges import EdgeLink
from secure_ci.device._journal import DeviceJournal
from secure_ci.device._local import LocalModel
from secure_ci.device._outcome import Attempt, TaskOutcome
from secure_ci.device._session import Input, Output, Session
from secure_ci.device._tasks import TaskReceipt
from secure_ci.exceptions import (
    ChannelError,
    DeadlineExceeded,
    ProtocolError,
    RemoteProtocolError,
    SecureCIError,
)
from secure_ci.partition._codec import decode_features, encode_features
from secure_ci.plan import (
    Configuration,
    Decision,
    EdgeEstimator,
    Planner,
    SpeedEstimator,
)
from secure_ci.protocol import InferResult

__all__ = ["Device"]

log = logging.getLogger(__name__)

SPEED_SAMPLE_SHARE = 0.2
"""Device runs that profile at less than this share of the whole model do not update the
device's speed estimate."""
HISTORY = 4096
"""Outcomes a device keeps in memory (the journal keeps all of them)."""


class Device:
    """A device over a fleet of edges (make it with :func:`open_device`)."""

    def __init__(
        self,
        local: LocalModel,
        planner: Planner,
        edges: Mapping[str, EdgeLink],
        *,
        journal: DeviceJournal | None,
        deadline_ms: float,
        slowdown: float,
        attempt_floor: float,
        attempt_cap: float,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self.local = local
        self.planner = planner
        self.journal = journal
        self.deadline_ms = deadline_ms
        self.speed = SpeedEstimator()
        self.stats: Counter[str] = Counter()
        self.history: deque[TaskOutcome] = deque(maxlen=HISTORY)
        self._edges = edges
        self._costs = planner.space.costs
        self._slowdown = slowdown
        self._floor, self._cap = attempt_floor, attempt_cap
        self._clock, self._monotonic, self._random = clock, monotonic, random_bytes
        self._evidence: set[asyncio.Future[None]] = set()

    @property
    def edges(self) -> tuple[str, ...]:
        return tuple(self._edges)

    @property
    def last(self) -> TaskOutcome | None:
        return self.history[-1] if self.history else None

    def estimator(self, edge: str) -> EdgeEstimator:
        """What this device has measured of ``edge`` (its link, queue, RTT and speed)."""
        return self._edges[edge].estimator

    def healthy(self) -> list[str]:
        """Edges that would get a task now."""
        now = self._monotonic()
        return [name for name, e in self._edges.items() if e.usable(now)]

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until every edge has a session (or ``timeout`` seconds; no error)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for e in self._edges.values():
                    await e.ready.wait()

    async def calibrate(self, runs: int = 5) -> float:
        """Measure this device against the package's profile: the whole model once to warm
        up, then the median of ``runs`` timed runs; the speed factor the planner starts
        from (one run on a busy machine can be far off)."""
        x = torch.zeros(self.local.package.input_shape)
        await asyncio.to_thread(self.local.run, (x,))
        times = []
        for _ in range(max(1, runs)):
            started = self._monotonic()
            await asyncio.to_thread(self.local.run, (x,))
            times.append((self._monotonic() - started) * 1e3)
        ms = await self._slow(statistics.median(times), self._costs.device_full_ms)
        if self._costs.device_full_ms > 0:
            self.speed.update(ms, self._costs.device_full_ms, self._monotonic())
        return self.speed.factor

    # -- inference ----------------------------------------------------------------------

    async def infer(self, x: Input, *, deadline_ms: float | None = None) -> Output:
        """Run one sample wherever the planner says; fails over; never loses it."""
        return (await self.run(x, deadline_ms=deadline_ms)).output

    async def infer_many(
        self, xs: Iterable[Input], *, max_in_flight: int = 8, deadline_ms: float | None = None
    ) -> list[Output]:
        """Outputs of ``xs`` in order, with up to ``max_in_flight`` tasks at once."""
        window = asyncio.Semaphore(max(1, max_in_flight))

        async def one(x: Input) -> Output:
            async with window:
                return await self.infer(x, deadline_ms=deadline_ms)

        tasks = [asyncio.create_task(one(x)) for x in xs]
        try:  # the first error as itself (not an ExceptionGroup); the rest are cancelled
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, x: Input, *, deadline_ms: float | None = None) -> TaskOutcome:
        """Like :meth:`infer`, with the whole outcome (mode, attempts, receipt, decision)."""
        inputs = x if isinstance(x, tuple) else (x,)
        self.local.check(inputs)  # before the journal: a bad input is never resumed
        key, salt = None, self._random(32)
        if self.journal is not None:
            blob = encode_features(inputs, "float32")
            key = await asyncio.to_thread(self.journal.begin, blob, salt, self._clock())
        return await self._run(key, inputs, salt, deadline_ms)

    async def resume(self) -> list[TaskOutcome]:
        """Finish every task the journal shows begun but not finished (after a crash)."""
        if self.journal is None:
            return []
        done = []
        for key, blob, salt in await asyncio.to_thread(self.journal.unfinished):
            done.append(await self._run(key, decode_features(blob), salt, None))
        return done

    async def _run(
        self,
        key: int | None,
        inputs: tuple[torch.Tensor, ...],
        salt: bytes,
        deadline_ms: float | None,
    ) -> TaskOutcome:
        start = self._monotonic()
        decision = self._decide(deadline_ms)
        config = decision.configuration
        self.stats["tasks"] += 1
        self.stats["plan_switches"] += decision.switched and self.stats["tasks"] > 1
        policy = None if config.exit is None else config.exit.policy
        first = await asyncio.to_thread(self.local.start, inputs, config.cut, config.codec, policy)
        profiled = self._profiled_ms(config, first.exited)
        self._observe_speed(profiled, await self._slow(first.ms, profiled))
        if first.output is not None:  # exited early, or the whole model ran here
            output = first.output[0] if len(first.output) == 1 else first.output
            mode = "exit" if first.exited else "device"
            return await self._finish(key, output, mode, config, (), start, None, decision)
        cut, codec, payload = config.cut, config.codec or "", first.payload or b""
        attempts: list[Attempt] = []
        edge: str | None = config.edge
        while edge is not None:
            attempt, accepted = await self._attempt(edge, payload, salt, cut, codec, decision)
            attempts.append(attempt)
            if accepted is not None:
                result, receipt, session = accepted
                output = await asyncio.to_thread(session.decode_output, result.payload)
                return await self._finish(
                    key, output, config.mode, config, attempts, start, receipt, decision, edge
                )
            edge = self._next_edge(decision, cut, codec, tried={a.edge for a in attempts})
        self.stats["local_tail"] += 1
        tail_ms = self._costs.tail_ms[self._costs.position(cut)]
        output = await self._locally(lambda _: self.local.finish(cut, payload), inputs, tail_ms)
        return await self._finish(
            key, output, "local-tail", config, attempts, start, None, decision
        )

    def _profiled_ms(self, config: Configuration, exited: bool) -> float:
        """What the package's profile predicts for this device's part of ``config``."""
        costs, ex = self._costs, config.exit
        if config.mode == "device":
            profiled = costs.device_full_ms
        elif config.mode == "edge":
            profiled = 0.0  # nothing but encoding ran here
        else:
            profiled = costs.head_ms[costs.position(config.cut)]
        if ex is not None:
            exit_head = costs.head_ms[costs.position(ex.policy.cut)] + ex.head_ms
            profiled = exit_head if exited else profiled + ex.head_ms
        return profiled

    def _observe_speed(self, profiled: float, ms: float) -> None:
        """This device's measured time against what the package's profile predicts."""
        # a head far smaller than the model is mostly fixed overhead (encoding, hand-offs):
        # its ratio says little of this device's speed, and would inflate the estimate
        if profiled >= SPEED_SAMPLE_SHARE * self._costs.device_full_ms:
            self.speed.update(ms, profiled, self._monotonic())

    def _decide(self, deadline_ms: float | None) -> Decision:
        now = self._monotonic()
        estimates = {n: e.estimator.estimate() for n, e in self._edges.items() if e.usable(now)}
        deadline = self.deadline_ms if deadline_ms is None else deadline_ms
        return self.planner.decide(
            estimates, now=now, device_speed=self.speed.factor, deadline_ms=deadline
        )

    def _next_edge(self, decision: Decision, cut: int, codec: str, tried: set[str]) -> str | None:
        """The cheapest other usable edge for the same cut and codec (the features are
        already encoded for them), by the decision's predictions."""
        now = self._monotonic()
        best, best_ms = None, math.inf
        for i, c in enumerate(self.planner.configurations):
            if c.cut != cut or c.codec != codec or c.edge is None or c.edge in tried:
                continue
            if not self._edges[c.edge].usable(now):
                continue
            ms = float(decision.table.expected_ms[i])
            if not math.isfinite(ms):  # the edge was not usable when the task was planned
                ms = float(self._costs.tail_ms[self._costs.position(cut)]) * 10
            if ms < best_ms:
                best, best_ms = c.edge, ms
        return best

    async def _attempt(
        self, name: str, payload: bytes, salt: bytes, cut: int, codec: str, decision: Decision
    ) -> tuple[Attempt, tuple[InferResult, TaskReceipt, Session] | None]:
        edge = self._edges[name]
        session = edge.session
        sent = self._monotonic()
        if session is None or session.failed:
            return Attempt(name, "failed", 0.0, "no session", sent=False), None
        edge.breaker.acquire(sent)
        limit = self._attempt_timeout(decision, name, cut, codec)
        future: asyncio.Future[tuple[InferResult, TaskReceipt]] | None = None
        try:
            async with asyncio.timeout(limit):
                future = await session.submit(payload, salt=salt, cut=cut, codec=codec)
                result, receipt = await asyncio.shield(future)
        except TimeoutError:
            self._abandon(edge, session, future)
            detail = f"no result within {limit:.3f} s"
            return self._failed(edge, session, sent, "timeout", detail, future), None
        except (ChannelError, DeadlineExceeded) as exc:
            return self._failed(edge, session, sent, "failed", str(exc), future), None
        except (RemoteProtocolError, ProtocolError) as exc:
            # a crashed edge's stream ends without Close: the session failed, no refusal
            outcome = "failed" if session.failed else "refused"
            return self._failed(edge, session, sent, outcome, str(exc), future), None
        except SecureCIError as exc:  # the result did not verify: this edge lies
            session.fail(ChannelError(f"edge {name} sent a result that did not verify"))
            return self._failed(edge, session, sent, "unverified", str(exc), future), None
        now = self._monotonic()
        edge.breaker.success(now)
        edge.last_used = now
        position = self._costs.position(cut)
        edge.estimator.observe_result(
            nbytes=len(payload),
            round_trip_ms=(now - sent) * 1e3,
            queue_ms=result.queue_us / 1e3,
            compute_ms=result.compute_us / 1e3,
            profiled_compute_ms=self._costs.tail_ms[position],
            now=now,
        )
        return Attempt(name, "ok", (now - sent) * 1e3), (result, receipt, session)

    def _attempt_timeout(self, decision: Decision, name: str, cut: int, codec: str) -> float:
        """Predicted time of this configuration at this edge, doubled, plus four standard
        deviations; at least ``attempt_floor`` and at most ``attempt_cap`` seconds."""
        for i, c in enumerate(self.planner.configurations):
            if c.edge == name and c.cut == cut and c.codec == codec and c.exit is None:
                ms = float(decision.table.full_path_ms[i])
                std = float(decision.table.std_ms[i])
                if math.isfinite(ms) and math.isfinite(std):
                    return min(self._cap, max(self._floor, (2 * ms + 4 * std) / 1e3))
        return self._cap

    def keep_evidence(self, session: Session) -> None:
        """Journal the signed requests ``session`` sent that got no verified result (the
        edge refused, failed, went silent or lied): the device can challenge the edge with
        each once it is overdue (a request-only challenge), so a dropped task leaves a trace.
        A request whose result comes later anyway is recorded as superseded, not challenged.

        The rows are written by a worker thread (each is an fsync: on a fail-over's path it
        would stall every task and connection of this device's event loop); a task's outcome
        is journalled only after them (:meth:`flush_evidence`), so a device killed meanwhile
        loses neither."""
        pending, session.unanswered = session.unanswered, []
        if self.journal is None or not pending:
            return
        journal, domain = self.journal, session.domain

        def write() -> None:
            for request, signature in pending:
                journal.record_unanswered(request, signature, domain)

        future = asyncio.ensure_future(asyncio.to_thread(write))
        self._evidence.add(future)
        future.add_done_callback(self._evidence.discard)

    async def flush_evidence(self) -> None:
        """Wait until every request handed to :meth:`keep_evidence` is on disk (raises the
        journal's error if a write failed)."""
        while self._evidence:
            await asyncio.gather(*list(self._evidence))

    def _failed(
        self,
        edge: EdgeLink,
        session: Session,
        sent: float,
        outcome: str,
        detail: str,
        future: asyncio.Future[tuple[InferResult, TaskReceipt]] | None,
    ) -> Attempt:
        now = self._monotonic()
        log.info("task failed over from %s (%s): %s", edge.name, outcome, detail)
        edge.breaker.failure(now)
        self.stats["failovers"] += 1
        self.keep_evidence(session)  # in the background: the next attempt goes out first
        return Attempt(edge.name, outcome, (now - sent) * 1e3, detail, sent=future is not None)

    def _abandon(
        self,
        edge: EdgeLink,
        session: Session,
        future: asyncio.Future[tuple[InferResult, TaskReceipt]] | None,
    ) -> None:
        """A task given up on at a silent edge: a late verified result is journalled as
        superseded; a session still silent after ``attempt_cap`` is given up."""
        if future is None:
            return

        def late(f: asyncio.Future[tuple[InferResult, TaskReceipt]]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            self.stats["superseded"] += 1
            if self.journal is not None:
                self.journal.record_superseded(f.result()[1])

        def still_silent() -> None:
            if not future.done():
                session.fail(DeadlineExceeded(f"edge {edge.name} went silent"))

        future.add_done_callback(late)
        asyncio.get_running_loop().call_later(self._cap, still_silent)

    async def _locally(
        self, fn: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]],
        inputs: tuple[torch.Tensor, ...], profiled_ms: float,
    ) -> Output:  # fmt: skip
        start = self._monotonic()
        out = await asyncio.to_thread(fn, inputs)
        ms = await self._slow((self._monotonic() - start) * 1e3, profiled_ms)
        if profiled_ms > 0:
            self.speed.update(ms, profiled_ms, self._monotonic())
        return out[0] if len(out) == 1 else out

    async def _slow(self, ms: float, profiled_ms: float) -> float:
        """Emulate a device ``slowdown`` times slower (demos and benchmarks): after work that
        took ``ms`` here, sleep ``slowdown - 1`` times what the profile says it takes (its
        measured time if it has no profile, like encoding alone), as the plan benchmark's rig
        does: a busy moment of this host then delays the emulated device once, not a hundred
        times. The emulated device's ms."""
        if self._slowdown <= 1:
            return ms
        extra = (profiled_ms if profiled_ms > 0 else ms) * (self._slowdown - 1)
        await asyncio.sleep(extra / 1e3)
        return ms + extra

    async def _finish(
        self,
        key: int | None,
        output: Output,
        mode: str,
        config: Configuration,
        attempts: Sequence[Attempt],
        start: float,
        receipt: TaskReceipt | None,
        decision: Decision,
        edge: str | None = None,
    ) -> TaskOutcome:
        if self.journal is not None and key is not None:
            await self.flush_evidence()  # a failed attempt's request is on disk first
            tried = json.dumps([[a.edge, a.outcome, round(a.ms, 3)] for a in attempts])
            await asyncio.to_thread(
                self.journal.finish, key, mode=mode, edge=edge, attempts=tried,
                receipt=receipt, now=self._clock(),
            )  # fmt: skip
        outcome = TaskOutcome(
            key, output, mode, config, edge, tuple(attempts),
            (self._monotonic() - start) * 1e3, receipt, decision,
        )  # fmt: skip
        self.stats[mode] += 1
        self.history.append(outcome)
        return outcome
