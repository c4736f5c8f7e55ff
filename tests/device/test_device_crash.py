"""A crashed edge is failed over on the connection-lost event, never on a timeout.

The edge runs in its own process and is killed with SIGKILL while a task's request is on
its way to it (held in the link shaper's uplink for an hour). The attempt's adaptive timeout
is pinned to an hour as well (the only timeout on a fleet attempt's path; a silent session
is given up after the same cap, and idle probes come an hour apart), so the task can only
come back within the test's guard if the device acted on the connection ending: the kernel
closing the dead process's socket, relayed by the shaper. No clock is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from secure_ci.device import DeviceIdentity, open_device
from secure_ci.device._journal import DeviceJournal
from secure_ci.ledger._records import LedgerDomain, TaskRequest
from secure_ci.package import ModelPackage
from secure_ci.testing import DEV_NOW, Link, open_link_shaper
from secure_ci.testing._digits import trained_digits as trained
from secure_ci.testing._edge_process import EdgeProcess, dev_fleet_policy, spawn_edges

KEY = bytes.fromhex("5c" * 32)
HOUR = 3600.0
GUARD = 120.0  # seconds: a hang guard, 30 times shorter than any timeout of the device


class GatedJournal(DeviceJournal):
    """A journal whose evidence writes wait for the test's gate (at most ``GUARD``): a
    device that wrote them on its event loop would stall there, with its next attempt."""

    gate: threading.Event
    opened: list[bool]

    def record_unanswered(
        self, request: TaskRequest, device_sig: bytes, domain: LedgerDomain
    ) -> None:
        self.opened.append(self.gate.wait(GUARD))
        super().record_unanswered(request, device_sig, domain)


@pytest.fixture
def edges(package_path: Path) -> Iterator[list[EdgeProcess]]:
    started = spawn_edges(package_path, [0, 0], devices=(DeviceIdentity(KEY).address_text,))
    try:
        yield started
    finally:
        for e in started:
            e.close()


async def test_a_killed_edge_fails_its_task_over_on_connection_lost_before_any_timeout(
    edges: list[EdgeProcess],
    package: ModelPackage,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="secure_ci.device._fleet")
    xs = [x.unsqueeze(0) for x in trained().data.test_x[:5]]
    policy, pki = dev_fleet_policy()
    async with contextlib.AsyncExitStack() as stack:
        shapers = [await stack.enter_async_context(open_link_shaper(e.port)) for e in edges]
        journal = stack.enter_context(GatedJournal.open(tmp_path / "device.db"))
        journal.gate, journal.opened = threading.Event(), []
        journal.gate.set()
        device = await stack.enter_async_context(
            open_device(
                [s.address for s in shapers], package=package, identity=DeviceIdentity(KEY),
                policy=policy, collateral=pki.collateral, journal=journal,
                clock=lambda: float(DEV_NOW), slowdown=100.0, early_exits=False,
                attempt_floor=HOUR, attempt_cap=HOUR, probe_interval=HOUR,
                margin=0.9, patience=10**6, jump=0.99,  # the plan stays on its edge
            )
        )  # fmt: skip
        async with asyncio.timeout(GUARD):
            await device.wait_ready()
            await device.infer_many(xs[:4], max_in_flight=2)
        planned = device.planner.current
        assert planned is not None
        assert planned.edge is not None
        victim = next(i for i, s in enumerate(shapers) if s.address == planned.edge)
        link, other = shapers[victim], shapers[1 - victim]
        link.shape(uplink=Link(delay_ms=HOUR * 1e3))  # the next request reaches it in an hour
        sent_before = link.stats().bytes_up
        task = asyncio.create_task(device.run(xs[4]))
        async with asyncio.timeout(GUARD):  # the request is on the victim's link
            while link.stats().bytes_up == sent_before:  # noqa: ASYNC110 - polling the link
                await asyncio.sleep(0.01)
        assert not task.done()
        journal.gate.clear()  # the dead edge's unanswered request waits to be written
        resent_before, local_before = other.stats().bytes_up, device.stats["local_tail"]
        await asyncio.to_thread(edges[victim].kill)  # SIGKILL, reaped
        async with asyncio.timeout(GUARD):  # the task goes on before its evidence is written
            while (  # noqa: ASYNC110 - polling the other link
                other.stats().bytes_up == resent_before
                and device.stats["local_tail"] == local_before
            ):
                await asyncio.sleep(0.01)
        assert not task.done()  # its outcome waits for the evidence
        journal.gate.set()
        async with asyncio.timeout(GUARD):
            outcome = await task
        closes = link.closes()
    said = [
        (r.msg.split(" ")[0], r.args[0])
        for r in caplog.records
        if r.name == "secure_ci.device._fleet" and isinstance(r.args, tuple)
        and r.msg.startswith(("task failed over", "session with edge %s failed"))
    ]  # fmt: skip
    # the session's failure is reported as the reader sees the connection end, before the
    # task it failed wakes up; the other edge's session, closed by us, never "failed"
    assert said[:2] == [("session", planned.edge), ("task", planned.edge)]
    assert all(edge == planned.edge for _, edge in said)
    first, last = outcome.attempts[0], outcome.attempts[-1]
    assert first.edge == planned.edge
    assert first.outcome == "failed"  # the connection ended: not "timeout"
    assert first.sent  # it was in flight
    assert first.ms < HOUR * 1e3
    assert journal.opened
    assert all(journal.opened)
    assert last.outcome == "ok" or outcome.mode == "local-tail"
    if last.outcome == "ok":
        assert last.edge == shapers[1 - victim].address
    assert outcome.receipt is None or outcome.receipt.request.edge != bytes(20)
    with torch.inference_mode():
        expected = package.partitioner().model(xs[4])
    assert int(outcome.output.argmax()) == int(expected.argmax())  # type: ignore[union-attr]
    torch.testing.assert_close(outcome.output, expected, atol=0.05, rtol=0)  # float16 features
    # the victim's kernel closed its socket, and the shaper passed it on to the device
    assert any(c.device_at is not None for c in closes)
    # the request the dead edge never answered is journalled (written off the event loop,
    # before the task's outcome), so the device can challenge it
    with DeviceJournal.open(tmp_path / "device.db") as reopened:
        kept = {(u.request.task_id, u.request.edge) for u in reopened.unanswered()}
        assert reopened.unfinished() == []
    assert outcome.receipt is not None or kept
    task_ids = {tid for tid, _ in kept}
    if outcome.receipt is not None:
        assert outcome.receipt.request.task_id in task_ids  # one task id across attempts
