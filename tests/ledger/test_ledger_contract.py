"""SecureCILedger semantics and every revert path, on the in-process EVM (real bytecode)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
from eth_account import Account

from secure_ci.exceptions import ContractRevertError, RecordError
from secure_ci.ledger import LedgerClient, open_ledger
from secure_ci.ledger._merkle import chain_head
from secure_ci.ledger._records import KeyRegistration, keccak256
from secure_ci.testing import LedgerWorld, ledger_world

pytestmark = pytest.mark.asyncio(loop_scope="module")
ZERO = bytes(32)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ledger() -> AsyncIterator[LedgerClient]:
    async with open_ledger("inprocess") as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(ledger: LedgerClient) -> LedgerWorld:
    return await ledger_world(ledger, edges=4, devices=2)


async def reverts(name: str, coro: object) -> None:
    with pytest.raises(ContractRevertError) as info:
        await coro  # type: ignore[misc]
    assert info.value.reason == name


async def test_registry_state(world: LedgerWorld) -> None:
    ledger = world.ledger
    assert await ledger.is_registered_device(world.devices[0].address)
    assert not await ledger.is_registered_device(world.edges[0].address)
    assert await ledger.is_allowed_measurement(world.measurement)
    assert not await ledger.is_allowed_measurement(keccak256(b"other"))
    info = await ledger.edge_info(world.edges[1].address)
    assert (info.party_id, info.quote_id, info.endpoint) == (
        world.party_id,
        world.quote_id,
        "127.0.0.1:9001",
    )
    assert [e.lower() for e in await ledger.edges()][-4:] == [
        e.address.lower() for e in world.edges
    ]
    state = await ledger.edge_state(world.edges[0].address)
    assert state.registered
    assert state.active
    assert state.measurement == world.measurement
    unknown = await ledger.edge_state(Account.create().address)
    assert not unknown.registered
    assert unknown.head == ZERO
    assert await ledger.challenge_window() == 3600


async def test_registry_reverts(world: LedgerWorld) -> None:
    ledger, admin, pid = world.ledger, world.admin, world.party_id
    stranger = Account.create()
    await ledger.fund(stranger.address, 10**18)
    other_pid = await ledger.register_party(stranger.address)
    new = Account.create()
    await reverts("NotPartyAdmin", ledger.register_device(stranger, pid, new))
    await reverts("UnknownParty", ledger.register_device(admin, 999, new))
    zero = "0x" + "00" * 20
    await reverts("ZeroAddress", ledger.register_device(admin, pid, zero, proof=bytes(65)))
    await reverts("DeviceTaken", ledger.register_device(stranger, other_pid, world.devices[0]))
    await reverts(
        "EdgeTaken",
        ledger.register_edge(stranger, other_pid, world.edges[0], ZERO, ZERO, "x"),
    )
    await reverts("NotPartyAdmin", ledger.register_model(stranger, pid, keccak256(b"m")))
    await ledger.register_model(admin, pid, keccak256(b"m"))
    assert await ledger.model_party(keccak256(b"m")) == pid
    await reverts("ModelTaken", ledger.register_model(stranger, other_pid, keccak256(b"m")))
    await reverts("NotPartyAdmin", ledger.revoke_device(stranger, world.devices[0]))
    await reverts("UnknownDevice", ledger.revoke_device(admin, new))
    await reverts("UnknownEdge", ledger.revoke_edge(admin, new))
    await reverts("NotPartyAdmin", ledger.revoke_edge(stranger, world.edges[0]))
    # governance calls from a key that administers no party
    outsider = Account.create()
    await ledger.fund(outsider.address, 10**18)
    rogue = LedgerClient.__new__(LedgerClient)
    rogue.__dict__.update(ledger.__dict__, owner=outsider)
    await reverts("NotParty", rogue.register_party(Account.create().address))
    await reverts("NotParty", rogue.allow_measurement(keccak256(b"rogue")))
    await reverts("NotParty", rogue.allow_measurement(world.measurement, allowed=False))


async def test_anchor_chain_and_verify(world: LedgerWorld) -> None:
    ledger, edge = world.ledger, world.edges[0]
    results = [world.result(seq) for seq in range(5)]
    batch0, tree0, receipt0 = await world.anchor(edge, results[:3], b"\x01" * 300)
    batch1, tree1, receipt1 = await world.anchor(edge, results[3:])
    assert (batch0, batch1) == (0, 1)
    head0 = chain_head(ZERO, tree0.root, keccak256(b"\x01" * 300), 0, 3)
    assert receipt0.new_head == head0
    assert receipt1.new_head == chain_head(head0, tree1.root, keccak256(b""), 3, 2)
    assert await ledger.batch_records_hash(edge.address, 0) == keccak256(b"\x01" * 300)
    state = await ledger.edge_state(edge.address)
    assert (state.next_batch_id, state.next_seq, state.head) == (2, 5, receipt1.new_head)
    info = await ledger.batch(edge.address, 1)
    assert (info.root, info.first_seq, info.count) == (tree1.root, 3, 2)
    assert info.block_number == receipt1.block_number
    for i, result in enumerate(results[:3]):
        digest = result.digest(ledger.domain)
        assert await ledger.verify_task(edge.address, 0, i, digest, tree0.proof(i))
        assert not await ledger.verify_task(edge.address, 0, i, keccak256(digest), tree0.proof(i))
        assert not await ledger.verify_task(edge.address, 1, i, digest, tree0.proof(i))
        assert not await ledger.verify_task(edge.address, 7, i, digest, tree0.proof(i))
    digest = results[0].digest(ledger.domain)
    assert not await ledger.verify_task(edge.address, 0, 1, digest, tree0.proof(0))  # wrong seq
    assert await ledger.batch_calldata(edge.address, 0) == b"\x01" * 300
    assert await ledger.batch_calldata(edge.address, 1) == b""
    events = await ledger.batches(edge.address)
    assert [(e.batch_id, e.first_seq, e.count, e.new_head) for e in events] == [
        (0, 0, 3, head0),
        (1, 3, 2, receipt1.new_head),
    ]
    await reverts("UnknownBatch", ledger.batch(edge.address, 2))


async def test_anchor_reverts(world: LedgerWorld) -> None:
    ledger, edge = world.ledger, world.edges[1]
    root = keccak256(b"root")
    await world.anchor(edge, [world.result(0)])
    s = await ledger.edge_state(edge.address)
    await reverts("BatchGap", ledger.anchor_batch(edge, 2, root, s.next_seq, 1, s.head, b""))
    await reverts("BatchReplay", ledger.anchor_batch(edge, 0, root, 0, 1, ZERO, b""))
    await reverts("FirstSeqMismatch", ledger.anchor_batch(edge, 1, root, 0, 1, s.head, b""))
    await reverts("FirstSeqMismatch", ledger.anchor_batch(edge, 1, root, 5, 1, s.head, b""))
    await reverts("PrevHeadMismatch", ledger.anchor_batch(edge, 1, root, 1, 1, ZERO, b""))
    await reverts("EmptyBatch", ledger.anchor_batch(edge, 1, root, 1, 0, s.head, b""))
    stranger = Account.create()
    await ledger.fund(stranger.address, 10**18)
    await reverts("UnknownEdge", ledger.anchor_batch(stranger, 0, root, 0, 1, ZERO, b""))
    # the measurement leaves the allow-list: anchoring stops until it is allowed again
    await ledger.allow_measurement(world.measurement, allowed=False)
    try:
        await reverts(
            "MeasurementNotAllowed", ledger.anchor_batch(edge, 1, root, 1, 1, s.head, b"")
        )
    finally:
        await ledger.allow_measurement(world.measurement)
    await ledger.anchor_batch(edge, 1, root, 1, 1, s.head, b"")
    assert (await ledger.edge_state(edge.address)).next_batch_id == 2


async def test_registration_needs_proof_of_key_possession(world: LedgerWorld) -> None:
    """No admin can register a key it does not hold (another party's device, say)."""
    ledger, admin, pid = world.ledger, world.admin, world.party_id
    device, other = Account.create(), Account.create()
    for_device = KeyRegistration(pid, bytes.fromhex(device.address[2:]))
    wrong_key = for_device.sign(other.key, ledger.domain)
    wrong_party = KeyRegistration(pid + 1, for_device.key).sign(device.key, ledger.domain)
    wrong_nonce = replace(for_device, nonce=1).sign(device.key, ledger.domain)
    for proof in (wrong_key, wrong_party, wrong_nonce, b"\x01" * 65, b""):
        await reverts(
            "NoKeyPossession", ledger.register_device(admin, pid, device.address, proof=proof)
        )
    with pytest.raises(RecordError, match="proof of possession"):
        await ledger.register_device(admin, pid, device.address)
    proof = for_device.sign(device.key, ledger.domain)
    await ledger.register_device(admin, pid, device.address, proof=proof)
    assert await ledger.is_registered_device(device.address)
    assert await ledger.registration_nonce(device.address) == 1
    # an edge's proof covers its measurement, quote id and endpoint
    edge = Account.create()
    detail = KeyRegistration.edge_detail(world.measurement, world.quote_id, "127.0.0.1:1")
    old = KeyRegistration(pid, bytes.fromhex(edge.address[2:]), detail).sign(
        edge.key, ledger.domain
    )
    register = functools.partial(
        ledger.register_edge, admin, pid, edge.address, world.measurement, world.quote_id
    )
    await reverts("NoKeyPossession", register("127.0.0.1:2", proof=old))
    await register("127.0.0.1:1", proof=old)
    assert (await ledger.edge_state(edge.address)).active
    # a published proof registers once: after a revocation the admin cannot replay it
    await ledger.revoke_edge(admin, edge.address)
    await reverts("NoKeyPossession", register("127.0.0.1:1", proof=old))
    assert not (await ledger.edge_state(edge.address)).active
    await ledger.register_edge(
        admin, pid, edge, world.measurement, world.quote_id, "127.0.0.1:1"
    )  # the key itself signs a fresh proof
    assert (await ledger.edge_state(edge.address)).active


async def test_revoked_edge_cannot_anchor(world: LedgerWorld) -> None:
    ledger, edge = world.ledger, world.edges[3]
    await ledger.revoke_edge(world.admin, edge)
    state = await ledger.edge_state(edge.address)
    assert state.registered
    assert not state.active
    await reverts("UnknownEdge", world.anchor(edge, [world.result(0)]))
    await ledger.register_edge(
        world.admin, world.party_id, edge, world.measurement, world.quote_id, "127.0.0.1:9003"
    )
    await world.anchor(edge, [world.result(0)])


async def test_challenge_answered(world: LedgerWorld) -> None:
    ledger, edge, device = world.ledger, world.edges[2], world.devices[0]
    results = [world.result(seq, task=b"answered" + bytes([seq])) for seq in range(3)]
    batch_id, tree, _ = await world.anchor(edge, results)
    cid = await ledger.challenge(device, results[1], world.sign(edge, results[1]))
    info = await ledger.challenge_info(cid)
    assert (info.state, info.seq, info.edge, info.device) == (1, 1, edge.address, device.address)
    assert info.record_hash == results[1].digest(ledger.domain)
    await reverts(
        "ChallengeExists", ledger.challenge(device, results[1], world.sign(edge, results[1]))
    )
    await reverts("InvalidProof", ledger.respond_challenge(edge, cid, batch_id, tree.proof(0)))
    await reverts("UnknownBatch", ledger.respond_challenge(edge, cid, 99, tree.proof(1)))
    await reverts("ChallengeWindowOpen", ledger.finalize_challenge(device, cid))
    await ledger.respond_challenge(edge, cid, batch_id, tree.proof(1))
    assert (await ledger.challenge_info(cid)).state == 2
    await reverts("ChallengeNotOpen", ledger.respond_challenge(edge, cid, batch_id, tree.proof(1)))
    await reverts("ChallengeNotOpen", ledger.finalize_challenge(device, cid))
    await reverts("UnknownChallenge", ledger.finalize_challenge(device, 10**6))
    await reverts("UnknownChallenge", ledger.challenge_info(0))


async def test_challenge_once_finds_the_open_challenge(world: LedgerWorld) -> None:
    # A device that sent a challenge and crashed before writing its id down gets that id back.
    ledger, edge, device = world.ledger, world.edges[3], world.devices[0]
    state = await ledger.edge_state(edge.address)
    sent, fresh = (world.result(state.next_seq + i, task=b"once%d" % i) for i in range(2))
    cid = await ledger.challenge(device, sent, world.sign(edge, sent))
    assert await ledger.challenge_once(device, sent, world.sign(edge, sent)) == cid
    opened = await ledger.challenge_once(device, fresh, world.sign(edge, fresh))
    assert opened not in (0, cid)
    assert (await ledger.challenge_info(opened)).record_hash == fresh.digest(ledger.domain)


async def test_challenge_omission(world: LedgerWorld) -> None:
    ledger, edge, device = world.ledger, world.edges[2], world.devices[1]
    state = await ledger.edge_state(edge.address)
    kept = world.result(state.next_seq, task=b"kept")
    omitted = world.result(state.next_seq + 1, task=b"omitted")
    batch_id, tree, _ = await world.anchor(edge, [kept])  # the edge leaves one record out
    signature = world.sign(edge, omitted)
    await reverts("NotRegisteredDevice", ledger.challenge(edge, omitted, signature))
    await reverts("InvalidEdgeSignature", ledger.challenge(device, omitted, b"\x01" * 65))
    stranger_sig = omitted.sign(keccak256(b"not an edge"), ledger.domain)
    await reverts("UnknownEdge", ledger.challenge(device, omitted, stranger_sig))
    cid = await ledger.challenge(device, omitted, signature)
    await reverts("SeqNotInBatch", ledger.respond_challenge(edge, cid, batch_id, tree.proof(0)))
    await ledger.advance_time(await ledger.challenge_window() + 1)
    await reverts("ChallengeWindowClosed", ledger.respond_challenge(edge, cid, batch_id, []))
    await ledger.finalize_challenge(device, cid)
    assert (await ledger.challenge_info(cid)).state == 3
    assert (await ledger.edge_state(edge.address)).omissions == state.omissions + 1


async def test_disputes(world: LedgerWorld) -> None:
    """A device sent one task to two edges and got different answers: recorded on chain
    (every revert of a dispute is in test_ledger_disputes)."""
    ledger, (a_edge, b_edge) = world.ledger, world.edges[:2]
    evidence = world.redundant((a_edge, b_edge))
    caller = world.devices[0]
    dispute_id = await ledger.dispute(caller, evidence)
    info = await ledger.dispute_info(dispute_id)
    assert (info.reporter, info.edges, info.dissenters) == (caller.address, 2, 0)
    assert info.task_id == evidence[0][0].task_id
    await reverts("DisputeExists", ledger.dispute(caller, evidence[::-1]))
    same = world.redundant((a_edge, b_edge), task=b"same", outputs=(b"x", b"x"))
    await reverts("SameOutput", ledger.dispute(caller, same))


async def test_record_hash_matches_python_records(world: LedgerWorld) -> None:
    result = world.result(9)
    expected = result.digest(world.ledger.domain)
    assert await world.ledger.hash_task_result(result) == expected
    as_dict = {"taskId": result.task_id, **{k: getattr(result, k) for k in result.__slots__}}
    assert await world.ledger.hash_task_result(as_dict) == expected
    as_tuple = tuple(getattr(result, k) for k in result.__slots__)
    assert await world.ledger.hash_task_result(as_tuple) == expected


async def test_gas_per_batch_is_flat(world: LedgerWorld) -> None:
    """anchorBatch never loops over records: 1 and 200 records cost the same execution gas."""
    edge = world.edges[0]
    state = await world.ledger.edge_state(edge.address)
    small = [world.result(state.next_seq)]
    _, _, one = await world.anchor(edge, small)
    big = [world.result(state.next_seq + 1 + i) for i in range(200)]
    _, _, many = await world.anchor(edge, big)
    assert abs(many.gas_used - one.gas_used) < 2_000
