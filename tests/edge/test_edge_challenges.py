"""The edge's challenge responder on the in-process chain: a result challenge, a request-only
challenge of a journalled request, and of a request the edge never saw (it refuses, signed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_utils import keccak

from secure_ci.edge._challenges import ChallengeResponder
from secure_ci.ledger import REFUSAL_NOT_RECEIVED, open_ledger
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._journal import Journal, sign_entry
from secure_ci.ledger._records import TaskRequest, TaskResult, task_id_for
from secure_ci.testing import LedgerWorld, ledger_world

pytestmark = pytest.mark.asyncio


def _request(world: LedgerWorld, i: int, edge: bytes) -> TaskRequest:
    device = bytes.fromhex(world.devices[0].address[2:])
    input_c = keccak(b"in" + bytes([i]))
    return TaskRequest(
        task_id_for(device, input_c), device, i, keccak(b"model"), 3, input_c, edge, 2**40,
        bytes(32),
    )  # fmt: skip


async def test_responder_answers_result_and_request_challenges(tmp_path: Path) -> None:
    async with open_ledger("inprocess") as ledger:
        world = await ledger_world(ledger, edges=1, devices=1, seed=21)
        edge, device = world.edges[0], world.devices[0]
        edge_addr = bytes.fromhex(edge.address[2:])
        domain = ledger.domain
        start = await ledger.block_number()
        journal = Journal.open(tmp_path / "edge.db", edge=edge_addr)
        requests = [_request(world, i, edge_addr) for i in range(5)]
        signatures = [r.sign(bytes(device.key), domain) for r in requests]
        entries = []
        for seq, (req, sig) in enumerate(zip(requests[:4], signatures, strict=False)):
            result = TaskResult(
                req.task_id, req.struct_hash(), keccak(b"out" + bytes([seq])),
                world.measurement, world.quote_id, 0, 5, seq,
            )  # fmt: skip
            entries.append(sign_entry(req, sig, result, bytes(edge.key), domain))
        journal.append_many(entries)
        await Anchorer(journal, ledger, edge, max_records=3).flush()
        responder = ChallengeResponder(ledger, journal, edge, start)

        by_result = await ledger.challenge(device, entries[1].result, entries[1].edge_sig)
        by_request = await ledger.challenge_request(device, requests[3], signatures[3])
        never_seen = await ledger.challenge_request(device, requests[4], signatures[4])
        assert await responder.poll() == 3
        assert (await ledger.challenge_info(by_result)).state == 2
        assert (await ledger.request_challenge_info(by_request)).state == 2
        refused = await ledger.request_challenge_info(never_seen)
        assert (refused.state, refused.refusal) == (4, REFUSAL_NOT_RECEIVED)
        assert (responder.answered, responder.refused) == (3, 1)
        assert await responder.poll() == 0
        journal.close()


async def test_an_edge_that_drops_a_request_is_recorded(tmp_path: Path) -> None:
    """The attack: the edge drops a request before answering, so the device holds no
    edge-signed result to challenge with. Its own signed request suffices now; an edge that
    stays silent gets an omission on chain."""
    async with open_ledger("inprocess") as ledger:
        world = await ledger_world(ledger, edges=1, devices=1, seed=22)
        edge, device = world.edges[0], world.devices[0]
        request = _request(world, 9, bytes.fromhex(edge.address[2:]))
        cid = await ledger.challenge_request(
            device, request, request.sign(bytes(device.key), ledger.domain)
        )
        await ledger.advance_time(await ledger.challenge_window() + 1)
        await ledger.finalize_request_challenge(device, cid)
        assert (await ledger.edge_state(edge.address)).omissions == 1
