"""The fleet device: plans each task, fails over without recomputing the head, runs offline.

Edges run in their own processes (``secure_ci.testing._edge_process``) so that they can be
killed with SIGKILL and frozen with SIGSTOP, as a crashed or hung edge would be; a lying
edge is a scripted TLS server whose results are signed by a key the enclave never bound.
Every output is compared with the package's model run on the device: a lost, duplicated or
wrong answer fails the test, never a clock.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_ci.device import Device, DeviceIdentity, open_device
from secure_ci.device._journal import DeviceJournal
from secure_ci.package import ModelPackage
from secure_ci.testing import DEV_NOW
from secure_ci.testing._digits import trained_digits as trained
from secure_ci.testing._edge_process import EdgeProcess, dev_fleet_policy, spawn_edges

KEY = bytes.fromhex("5a" * 32)


@pytest.fixture
def edges(package_path: Path) -> Iterator[list[EdgeProcess]]:
    device = DeviceIdentity(KEY).address_text
    started = spawn_edges(package_path, [0, 0], devices=(device,))
    try:
        yield started
    finally:
        for e in started:
            e.close()


def _samples(n: int) -> list[torch.Tensor]:
    return [x.unsqueeze(0) for x in trained().data.test_x[:n]]


def _expected(package: ModelPackage, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    model = package.partitioner().model
    with torch.inference_mode():
        return [model(x) for x in xs]


def _same(outputs: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 0.05) -> None:
    assert len(outputs) == len(expected)
    for y, e in zip(outputs, expected, strict=True):
        assert int(y.argmax()) == int(e.argmax())
        torch.testing.assert_close(y, e, atol=atol, rtol=0)


def _device(
    addresses: list[str], package: ModelPackage, **options: object
) -> AsyncIterator[Device]:
    policy, pki = dev_fleet_policy()
    options.setdefault("clock", lambda: float(DEV_NOW))
    options.setdefault("early_exits", False)  # outputs are the whole model's
    options.setdefault("codecs", ("float32", "float16"))  # ... to within float16's rounding
    return open_device(  # type: ignore[arg-type]
        addresses, package=package, identity=DeviceIdentity(KEY), policy=policy,
        collateral=pki.collateral, **options,
    )  # fmt: skip


async def test_tasks_are_planned_and_split_with_the_edges(
    edges: list[EdgeProcess], package: ModelPackage
) -> None:
    xs = _samples(12)
    async with _device(
        [e.address for e in edges], package, slowdown=100.0, probe_interval=0.1
    ) as device:
        await device.wait_ready()
        assert sorted(device.healthy()) == sorted(e.address for e in edges)
        outputs = await device.infer_many(xs, max_in_flight=4)
        modes = {o.mode for o in device.history}
        explained = device.history[-1].decision.explain()
        async with asyncio.timeout(30):  # idle edges are pinged: their RTT gets measured
            while not all(  # noqa: ASYNC110 - polling what the keepers measure
                device.estimator(e.address).rtt.count >= 2 for e in edges
            ):
                await asyncio.sleep(0.1)
    _same(outputs, _expected(package, xs))
    assert modes <= {"edge", "split"}  # a 20x slower device offloads
    assert all(o.receipt is not None and o.failovers == 0 for o in device.history)
    assert explained.rows
    assert explained.chosen.configuration == device.history[-1].configuration


async def test_without_edges_every_task_runs_on_the_device(package: ModelPackage) -> None:
    xs = _samples(4)
    async with _device([], package) as device:
        outputs = [await device.infer(x) for x in xs]
    _same(outputs, _expected(package, xs), atol=1e-5)
    assert [o.mode for o in device.history] == ["device"] * 4


async def test_a_killed_edge_is_failed_over_without_recomputing_the_head(
    edges: list[EdgeProcess], package: ModelPackage, tmp_path: Path
) -> None:
    xs = _samples(40)
    with DeviceJournal.open(tmp_path / "device.db") as journal:
        async with _device(
            [e.address for e in edges], package, slowdown=100.0, journal=journal
        ) as device:
            await device.wait_ready()
            first = await device.infer_many(xs[:10], max_in_flight=4)
            served = Counter(o.edge for o in device.history if o.edge is not None)
            assert served, "a 20x slower device offloads"
            busiest = served.most_common(1)[0][0]
            victim = next(e for e in edges if e.address == busiest)
            victim.kill()
            rest = await device.infer_many(xs[10:], max_in_flight=4)
            outcomes = list(device.history)
        assert journal.unfinished() == []
        kept = list(journal.tasks())
        unanswered = {u.request.task_id: u.request.edge for u in journal.unanswered()}
    _same(first + rest, _expected(package, xs))
    after = outcomes[10:]
    assert all(o.edge != busiest for o in after)  # nothing accepted from the dead edge
    moved = [o for o in after if any(a.edge == busiest for a in o.attempts)]
    for o in moved:  # tried at the dead edge, then accepted elsewhere or finished here
        assert o.attempts[-1].outcome == "ok" or o.mode == "local-tail", o
    for o in moved:  # the request the dead edge never answered is kept, to challenge it
        if o.receipt is not None and o.attempts[0].sent:
            assert o.receipt.request.task_id in unanswered  # one task id across attempts
            assert unanswered[o.receipt.request.task_id] != o.receipt.request.edge

    accepted = [o.receipt.request.task_id for o in outcomes if o.receipt is not None]
    assert len(set(accepted)) == len(accepted)  # one accepted result per task
    answered = [t.task_id for t in kept if t.state != "superseded"]
    assert sorted(answered) == sorted(accepted)  # every accepted receipt journalled, once


async def test_a_hung_edge_times_out_and_its_tasks_go_elsewhere(
    edges: list[EdgeProcess], package: ModelPackage
) -> None:
    xs = _samples(16)
    async with _device(
        [e.address for e in edges], package, slowdown=100.0, attempt_cap=2.0,
        margin=0.9, patience=10**6, jump=0.99,  # the plan stays on its edge unless it breaks
    ) as device:  # fmt: skip
        await device.wait_ready()
        await device.infer_many(xs[:4])
        planned = device.planner.current
        assert planned is not None
        victim = next(e for e in edges if e.address == planned.edge)
        victim.stop()
        try:
            outputs = await device.infer_many(xs, max_in_flight=4)
        finally:
            victim.cont()
        failed_over = [o for o in device.history if o.failovers]
    _same(outputs, _expected(package, xs))
    assert failed_over, "the stopped edge was never tried"
    for o in failed_over:
        assert o.attempts[0].edge == victim.address
        assert o.attempts[0].outcome == "timeout"
        assert o.edge != victim.address
        assert o.attempts[-1].outcome == "ok"


async def test_with_every_edge_hung_the_tail_runs_here_on_the_same_features(
    edges: list[EdgeProcess], package: ModelPackage
) -> None:
    xs = _samples(4)
    async with _device([e.address for e in edges], package, slowdown=100.0) as device:
        await device.wait_ready()
        await device.infer(xs[0])
        for e in edges:
            e.stop()
        try:
            outputs = [await device.infer(x) for x in xs]
        finally:
            for e in edges:
                e.cont()
        after = list(device.history)[1:]
    _same(outputs, _expected(package, xs))
    first = after[0]
    assert first.mode == "local-tail"  # both edges tried, then the tail ran here
    assert sorted(a.edge for a in first.attempts) == sorted(e.address for e in edges)
    assert all(a.outcome == "timeout" for a in first.attempts)
    # later tasks run here too: device-only while both breakers are open, or the tail
    # after a half-open probe timed out (each probe waits twice as long to come)
    assert {o.mode for o in after[1:]} <= {"device", "local-tail"}
    assert sum(len(o.attempts) for o in after[1:]) <= 2 * 3


async def test_a_device_killed_mid_task_resumes_from_its_journal(
    edges: list[EdgeProcess], package: ModelPackage, tmp_path: Path
) -> None:
    xs = _samples(3)
    with DeviceJournal.open(tmp_path / "device.db") as journal:
        # what a device killed after begin() and before finish() leaves behind
        from secure_ci.partition._codec import encode_features

        keys = [journal.begin(encode_features((x,), "float32"), bytes(32), 0.0) for x in xs]
    with DeviceJournal.open(tmp_path / "device.db") as journal:
        async with _device(
            [e.address for e in edges], package, slowdown=100.0, journal=journal
        ) as device:
            await device.wait_ready()
            resumed = await device.resume()
        assert [o.key for o in resumed] == keys
        assert journal.unfinished() == []
        outcome = journal.outcome(keys[0])
    _same([o.output for o in resumed], _expected(package, xs))  # type: ignore[misc]
    assert outcome is not None
    assert json.loads(outcome[2])[-1][1] == "ok"


def test_the_breaker_backs_off_a_flapping_edge() -> None:
    from secure_ci.device import Breaker, BreakerState

    b = Breaker(min_backoff=1.0, max_backoff=8.0, forgive_after=100.0)
    assert b.allows(0.0)
    waits = []
    now = 0.0
    for _ in range(5):
        b.failure(now)
        assert b.state is BreakerState.OPEN
        assert not b.allows(now)
        waits.append(b.retry_at - now)
        now = b.retry_at
        assert b.allows(now)  # half-open: one probe
        b.acquire(now)
        assert not b.allows(now)
        b.success(now)
        assert b.allows(now)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]  # a flapping edge stays out longer each time
    b.success(now + 100.0)
    b.failure(now + 100.0)
    assert b.retry_at - (now + 100.0) == 1.0  # healthy long enough: forgiven


async def test_concurrent_tasks_on_a_fresh_device_do_not_block(package: ModelPackage) -> None:
    async with _device(["127.0.0.1:9"], package, connect_timeout=2.0) as device:
        outputs = await asyncio.gather(*(device.infer(x) for x in _samples(3)))
    assert len(outputs) == 3


def test_device_infer_plan_runs_every_input_and_survives_a_dead_edge(
    edges: list[EdgeProcess], package_path: Path, package: ModelPackage, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from secure_ci.cli import app
    from secure_ci.testing import DEV_MRENCLAVE

    _, pki = dev_fleet_policy()
    (tmp_path / "root.pem").write_text(pki.root_pem)
    (tmp_path / "collateral.json").write_text(pki.collateral_json)
    (tmp_path / "policy.toml").write_text(
        f'[attestation]\nroots = ["root.pem"]\nmrenclave = ["{DEV_MRENCLAVE.hex()}"]\n'
    )
    (tmp_path / "device.key").write_text(KEY.hex())
    xs = _samples(5)
    np.save(tmp_path / "x.npy", torch.cat(xs).numpy())
    edges[0].kill()  # dead before the device starts: the plan uses the other one
    args = [
        "device", "infer", str(tmp_path / "x.npy"), "--edge", edges[0].address, "--plan",
        "--package", str(package_path), "--policy", str(tmp_path / "policy.toml"),
        "--identity", str(tmp_path / "device.key"), "--at", str(DEV_NOW),
        "--journal", str(tmp_path / "journal.db"), "--timeout", "5",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {line["mode"] for line in lines} <= {"device", "exit"}  # its only edge is dead
    expected = _expected(package, xs)
    _same_argmax(lines, expected)
    assert "5 tasks" in result.stderr
    live = args.copy()
    live[live.index("--edge") + 1] = edges[1].address
    live.insert(live.index("--plan"), "--deadline-ms")
    live.insert(live.index("--plan"), "1000")
    result = CliRunner().invoke(app, live)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    _same_argmax(lines, expected)
    assert [line["input"] for line in lines] == [f"{tmp_path / 'x.npy'}[{i}]" for i in range(5)]


def _same_argmax(lines: list[dict[str, object]], expected: list[torch.Tensor]) -> None:
    """Every input printed, in order; the model's class unless a calibrated exit answered."""
    assert len(lines) == len(expected)
    for line, e in zip(lines, expected, strict=True):
        if line["mode"] != "exit":
            assert line["argmax"] == int(e.argmax())


def test_the_blocking_device_runs_tasks_from_plain_code(package: ModelPackage) -> None:
    from secure_ci.device import open_device_sync

    policy, pki = dev_fleet_policy()
    xs = _samples(3)
    with open_device_sync(
        [], package=package, identity=DeviceIdentity(KEY), policy=policy,
        collateral=pki.collateral, clock=lambda: float(DEV_NOW), early_exits=False,
    ) as device:  # fmt: skip
        outputs = device.infer_many(xs)
        outcome = device.run(xs[0])
    _same(outputs, _expected(package, xs), atol=1e-5)
    assert outcome.mode == "device"


async def test_a_confident_exit_ends_the_task_on_the_device(package: ModelPackage) -> None:
    from secure_ci.partition import should_exit

    assert package.exits, "the digits package is packed with exit heads"
    xs = _samples(24)
    async with _device([], package, accuracy_budget=100.0, early_exits=True) as device:
        outcomes = [await device.run(x) for x in xs]
    exited = [(x, o) for x, o in zip(xs, outcomes, strict=True) if o.mode == "exit"]
    assert exited, [str(o.configuration) for o in outcomes]
    full = package.partitioner().model
    for x, o in zip(xs, outcomes, strict=True):
        ex = o.configuration.exit
        assert ex is not None  # the planner chose an exit policy: cheaper within the budget
        head, _ = package.partitioner().split(ex.policy.cut)
        with torch.inference_mode():
            boundary = head(x)
            boundary = boundary if isinstance(boundary, tuple) else (boundary,)
            logits = package.exit_head(ex.policy.cut)(*boundary)
            confident = bool(should_exit(logits, ex.policy).all())
            expected = logits if confident else full(x)
        assert (o.mode == "exit") == confident
        torch.testing.assert_close(o.output, expected, atol=1e-5, rtol=0)


async def test_a_lying_edge_is_caught_and_its_tasks_go_to_an_honest_one(
    package_path: Path, package: ModelPackage
) -> None:
    device = DeviceIdentity(KEY).address_text
    liar = spawn_edges(package_path, [0], devices=(device,), lie=True)[0]
    honest = spawn_edges(package_path, [0], devices=(device,))[0]
    xs = _samples(8)
    try:
        async with _device(
            [liar.address, honest.address], package, slowdown=100.0, cuts=[0]
        ) as fleet:
            await fleet.wait_ready()
            outputs = await fleet.infer_many(xs, max_in_flight=2)
            outcomes = list(fleet.history)
    finally:
        liar.close()
        honest.close()
    _same(outputs, _expected(package, xs))
    assert all(o.edge in (honest.address, None) for o in outcomes)  # never the liar's
    caught = [a for o in outcomes for a in o.attempts if a.edge == liar.address]
    assert caught, "the liar was never tried"
    assert {a.outcome for a in caught} <= {"unverified", "failed"}
    assert "unverified" in {a.outcome for a in caught}


async def test_a_bad_input_in_a_stream_raises_its_own_error(package: ModelPackage) -> None:
    from secure_ci.exceptions import PartitionError

    xs = [*_samples(2), torch.zeros(1, 3, 5, 5)]  # the model takes 1x8x8 images
    async with _device([], package) as device:
        with pytest.raises(PartitionError):  # not an ExceptionGroup
            await device.infer_many(xs)
        assert len(await device.infer_many(xs[:2])) == 2  # the device still works
