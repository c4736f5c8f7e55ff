"""A fleet device with a ledger reconciles its journal in the background: an overdue request
that got no result is challenged on chain without anyone running `receipts --check`, and a
chain that is down is retried until it answers (nothing in the journal is lost meanwhile)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from eth_utils import keccak

from secure_ci.device import Device, DeviceIdentity, open_device
from secure_ci.device._journal import DeviceJournal
from secure_ci.device._reconcile import reconcile
from secure_ci.exceptions import AuthorizationError, ChainError, ConfigError
from secure_ci.ledger import Deployment, LedgerClient, open_ledger
from secure_ci.ledger._records import TaskRequest, task_id_for
from secure_ci.package import ModelPackage
from secure_ci.testing import DEV_NOW, LedgerWorld, ledger_world
from secure_ci.testing._edge_process import dev_fleet_policy


@pytest.fixture
async def world() -> AsyncIterator[LedgerWorld]:
    async with open_ledger("inprocess") as ledger:
        yield await ledger_world(ledger, edges=1, devices=1, seed=41)


class _Flaky:
    """The ledger behind a switch: while ``down``, every call fails as an unreachable
    node's would (ChainError); otherwise it is the real ledger."""

    def __init__(self, ledger: LedgerClient) -> None:
        self.down = True
        self._ledger = ledger

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ledger, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise ChainError("ClientConnectorError: cannot connect to 127.0.0.1:8545")
            return await attr(*args, **kwargs)

        return call


def _overdue(world: LedgerWorld, device: DeviceIdentity, now: int, tag: bytes) -> TaskRequest:
    edge = bytes.fromhex(world.edges[0].address[2:])
    input_c = keccak(b"in" + tag)
    return TaskRequest(
        task_id_for(device.address, input_c), device.address, 0, keccak(b"m"), 2, input_c,
        edge, now - 120, bytes(32),
    )  # fmt: skip


def _device(
    package: ModelPackage, world: LedgerWorld, book: DeviceJournal, ledger: Any
) -> AbstractAsyncContextManager[Device]:
    policy, pki = dev_fleet_policy()
    return open_device(
        [], package=package, identity=DeviceIdentity(bytes(world.devices[0].key)),
        policy=policy, collateral=pki.collateral, journal=book, domain=world.ledger.domain,
        ledger=ledger, reconcile_interval=0.02, grace=60, clock=lambda: float(DEV_NOW),
    )  # fmt: skip


async def _until_challenged(book: DeviceJournal, device: Device) -> None:
    async with asyncio.timeout(60):
        while any(u.challenge_id is None for u in book.unanswered()):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_the_device_challenges_an_overdue_request_in_the_background(
    package: ModelPackage, world: LedgerWorld, tmp_path: Path
) -> None:
    identity = DeviceIdentity(bytes(world.devices[0].key))
    ledger = world.ledger
    q = _overdue(world, identity, await ledger.timestamp(), b"quiet edge")
    with DeviceJournal.open(tmp_path / "d.db") as book:
        book.record_unanswered(q, q.sign(identity.key, ledger.domain), ledger.domain)
        async with _device(package, world, book, ledger) as device:
            y = await device.infer(torch.zeros(package.input_shape))
            await _until_challenged(book, device)
        [u] = list(book.unanswered())
    assert y.shape[-1] == 10
    assert u.challenge_id is not None
    info = await ledger.request_challenge_info(u.challenge_id)
    assert (info.state, info.request_hash) == (1, q.struct_hash())


async def test_a_chain_that_is_down_is_retried_until_it_answers(
    package: ModelPackage, world: LedgerWorld, tmp_path: Path
) -> None:
    identity = DeviceIdentity(bytes(world.devices[0].key))
    flaky = _Flaky(world.ledger)
    q = _overdue(world, identity, await world.ledger.timestamp(), b"while down")
    with DeviceJournal.open(tmp_path / "d.db") as book:
        book.record_unanswered(q, q.sign(identity.key, world.ledger.domain), world.ledger.domain)
        async with _device(package, world, book, flaky) as device:
            for _ in range(5):  # tasks run on the device while the chain is down
                await device.infer(torch.zeros(package.input_shape))
            assert device.stats["reconciled"] == 0
            assert [u.challenge_id for u in book.unanswered()] == [None]
            flaky.down = False
            await _until_challenged(book, device)
            assert device.stats["reconciled"] >= 1
    assert device.stats["tasks"] == 5


async def test_a_ledger_without_a_journal_is_a_configuration_error(
    package: ModelPackage, world: LedgerWorld
) -> None:
    policy, pki = dev_fleet_policy()
    with pytest.raises(ConfigError, match="needs a journal"):
        async with open_device(
            [], package=package, identity=DeviceIdentity(bytes(world.devices[0].key)),
            policy=policy, collateral=pki.collateral, ledger=world.ledger,
        ):  # fmt: skip
            pass


def _deployment(ledger: LedgerClient) -> Deployment:
    domain = ledger.domain
    return Deployment(domain.chain_id, domain.contract, 0, "http://127.0.0.1:8545")


async def test_a_device_given_a_deployment_reads_the_edges_from_the_registry(
    package: ModelPackage, world: LedgerWorld, tmp_path: Path
) -> None:
    policy, pki = dev_fleet_policy()
    registered = [e.endpoint for e in await world.ledger.registered_edges()]
    with DeviceJournal.open(tmp_path / "d.db") as book:
        async with open_device(
            _deployment(world.ledger), package=package,
            identity=DeviceIdentity(bytes(world.devices[0].key)), policy=policy,
            collateral=pki.collateral, journal=book, ledger=world.ledger,
            reconcile_interval=0.02, connect_timeout=2.0, clock=lambda: float(DEV_NOW),
        ) as device:  # fmt: skip
            # nothing listens at the registered endpoint: the task runs here
            await device.infer(torch.zeros(package.input_shape))
            async with asyncio.timeout(60):
                while device.stats["reconciled"] == 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
    assert device.edges == tuple(registered[::-1])
    assert device.healthy() == [] or set(device.healthy()) <= set(registered)


async def test_a_deployment_without_a_usable_edge_is_refused(
    package: ModelPackage, tmp_path: Path
) -> None:
    policy, pki = dev_fleet_policy()
    async with open_ledger("inprocess") as ledger:
        world = await ledger_world(ledger, edges=0, devices=1, seed=43)
        with pytest.raises(AuthorizationError, match="no edge on the ledger"):
            async with open_device(
                _deployment(ledger), package=package,
                identity=DeviceIdentity(bytes(world.devices[0].key)), policy=policy,
                collateral=pki.collateral, ledger=ledger,
            ):  # fmt: skip
                pass


async def test_a_challenge_sent_but_not_written_down_does_not_stall_the_rest(
    world: LedgerWorld, tmp_path: Path
) -> None:
    """The device crashed after its challenge went out and before its journal said so: the
    next pass finds that challenge on chain, writes it down, and challenges the others."""
    identity = DeviceIdentity(bytes(world.devices[0].key))
    ledger, account = world.ledger, world.devices[0]
    now = await ledger.timestamp()
    first, second = (_overdue(world, identity, now, tag) for tag in (b"crashed", b"next"))
    with DeviceJournal.open(tmp_path / "d.db") as book:
        for q in (first, second):
            book.record_unanswered(q, q.sign(identity.key, ledger.domain), ledger.domain)
        sent = await ledger.challenge_request(
            account, first, first.sign(identity.key, ledger.domain)
        )
        done = await reconcile(book, ledger, identity, domain=ledger.domain, grace=0)
        ids = {u.request.task_id: u.challenge_id for u in book.unanswered()}
    assert done.requests_challenged == 2
    assert ids[first.task_id] == sent
    assert ids[second.task_id] is not None
    assert ids[second.task_id] != sent
