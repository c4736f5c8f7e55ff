"""Requests that got no result: the device journal keeps them, and `receipts --check`
challenges the edge of each overdue one with the signed request alone (request-only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_utils import keccak

from secure_ci.device import DeviceIdentity
from secure_ci.device._journal import DeviceJournal
from secure_ci.device._reconcile import reconcile
from secure_ci.ledger import open_ledger
from secure_ci.ledger._records import TaskRequest, task_id_for
from secure_ci.testing import ledger_world


def _request(device: bytes, edge: bytes, deadline: int, tag: bytes) -> TaskRequest:
    input_c = keccak(b"in" + tag)
    return TaskRequest(
        task_id_for(device, input_c), device, 0, keccak(b"m"), 2, input_c, edge, deadline,
        bytes(32),
    )  # fmt: skip


def test_journal_keeps_unanswered_requests(tmp_path: Path) -> None:
    from secure_ci.ledger import LedgerDomain

    domain = LedgerDomain(31337, b"\x01" * 20)
    with DeviceJournal.open(tmp_path / "d.db") as book:
        q = _request(b"\x02" * 20, b"\x03" * 20, 100, b"a")
        book.record_unanswered(q, b"\x04" * 65, domain)
        book.record_unanswered(q, b"\x04" * 65, domain)  # kept once
        [u] = list(book.unanswered())
        assert (u.request, u.device_sig, u.domain, u.challenge_id) == (
            q,
            b"\x04" * 65,
            domain,
            None,
        )
        book.mark_request_challenged(q, 7)
        assert next(book.unanswered()).challenge_id == 7
    with DeviceJournal.open(tmp_path / "d.db") as book:  # durable
        assert len(list(book.unanswered())) == 1


@pytest.mark.asyncio
async def test_check_challenges_overdue_unanswered_requests(tmp_path: Path) -> None:
    async with open_ledger("inprocess") as ledger:
        world = await ledger_world(ledger, edges=1, devices=1, seed=31)
        account = world.devices[0]
        device = DeviceIdentity(bytes(account.key))
        edge = bytes.fromhex(world.edges[0].address[2:])
        now = await ledger.timestamp()
        overdue = _request(device.address, edge, now - 120, b"overdue")
        fresh = _request(device.address, edge, now + 3600, b"fresh")
        with DeviceJournal.open(tmp_path / "d.db") as book:
            for q in (overdue, fresh):
                book.record_unanswered(q, q.sign(device.key, ledger.domain), ledger.domain)
            done = await reconcile(book, ledger, device, domain=ledger.domain, grace=60)
            assert done.requests_challenged == 1
            states = {u.request.task_id: u.challenge_id for u in book.unanswered()}
        assert states[fresh.task_id] is None
        challenge_id = states[overdue.task_id]
        assert challenge_id is not None
        info = await ledger.request_challenge_info(challenge_id)
        assert (info.state, info.request_hash) == (1, overdue.struct_hash())
