"""Records bound on chain and positions bound in proofs (issue 11), against the real contract
on the in-process EVM: each attack here got through the contract before these changes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from eth_utils import keccak

from secure_ci.exceptions import ContractRevertError
from secure_ci.ledger import LedgerClient, open_ledger
from secure_ci.ledger._merkle import chain_head, leaf_hash
from secure_ci.testing import LedgerWorld, ledger_world

pytestmark = pytest.mark.asyncio(loop_scope="module")
ZERO = bytes(32)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ledger() -> AsyncIterator[LedgerClient]:
    async with open_ledger("inprocess") as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(ledger: LedgerClient) -> LedgerWorld:
    return await ledger_world(ledger, edges=4, devices=2, seed=11)


async def reverts(name: str, coro: object) -> None:
    with pytest.raises(ContractRevertError) as info:
        await coro  # type: ignore[misc]
    assert info.value.reason == name


async def test_head_chain_commits_to_the_records(world: LedgerWorld) -> None:
    """Two batches with the same root but other published records get other heads."""
    ledger, edge = world.ledger, world.edges[0]
    results = [world.result(seq, task=b"heads") for seq in range(2)]
    _, tree, receipt = await world.anchor(edge, results, b"published records")
    assert receipt.new_head == chain_head(ZERO, tree.root, keccak(b"published records"), 0, 2)
    assert receipt.new_head != chain_head(ZERO, tree.root, keccak(b"other records"), 0, 2)
    assert await ledger.batch_records_hash(edge.address, 0) == keccak(b"published records")
    await reverts("UnknownBatch", ledger.batch_records_hash(edge.address, 1))


async def test_leaf_at_the_wrong_position_does_not_answer(world: LedgerWorld) -> None:
    """The edge builds its tree with the challenged record at another position (so the
    position the calldata shows holds something else): with OpenZeppelin's sorted pairs its
    proof was accepted; a positional proof of that position is not."""
    ledger, edge, device = world.ledger, world.edges[1], world.devices[0]
    domain = ledger.domain
    other = world.result(0, task=b"shown")
    shown = leaf_hash(0, other.digest(domain))
    for tag in range(256):  # a record whose leaf sorts first: the sorted-pair root is then
        challenged = world.result(1, task=b"moved" + bytes([tag]))  # this positional one
        moved = leaf_hash(1, challenged.digest(domain))
        if moved < shown:
            break
    root = keccak(moved + shown)  # the leaf of seq 1 placed at index 0
    await ledger.anchor_batch(edge, 0, root, 0, 2, ZERO, b"")
    cid = await ledger.challenge(device, challenged, world.sign(edge, challenged))
    await reverts("InvalidProof", ledger.respond_challenge(edge, cid, 0, [shown]))
    assert not await ledger.verify_task(edge.address, 0, 1, challenged.digest(domain), [shown])
    # nor with the proof padded or cut
    await reverts("InvalidProof", ledger.respond_challenge(edge, cid, 0, [shown, shown]))
    await reverts("InvalidProof", ledger.respond_challenge(edge, cid, 0, []))


async def test_positional_proofs_on_chain_match_python(world: LedgerWorld) -> None:
    ledger, edge = world.ledger, world.edges[2]
    for count in (1, 2, 3, 5, 7, 12):
        state = await ledger.edge_state(edge.address)
        results = [world.result(state.next_seq + i, task=b"pos") for i in range(count)]
        batch_id, tree, _ = await world.anchor(edge, results)
        for i, r in enumerate(results):
            digest = r.digest(ledger.domain)
            assert await ledger.verify_task(
                edge.address, batch_id, r.edge_seq, digest, tree.proof(i)
            )
            if count > 1:
                j = (i + 1) % count
                assert not await ledger.verify_task(
                    edge.address, batch_id, r.edge_seq, digest, tree.proof(j)
                )
