"""Audit findings on the in-process chain (py-evm, the Solidity contract): each rule against
a chain built to break it, and the honest chain that has none."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from secure_ci.exceptions import ChainError, LedgerError, SignatureError
from secure_ci.ledger import open_ledger
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._calldata import AnchoredRecord, BatchRecords, encode_batch
from secure_ci.ledger._client import LedgerClient
from secure_ci.ledger._findings import FindingCode
from secure_ci.ledger._records import TaskRequest, TaskResult, keccak256, task_id_for
from secure_ci.testing import LedgerWorld, ledger_world

pytestmark = pytest.mark.slow


@dataclass
class Item:
    """One record to anchor: the device's signed request and what the edge answers."""

    request: TaskRequest
    sig: bytes
    output: bytes = b"out"
    quote_id: bytes | None = None


@dataclass
class Device:
    """A device that chains its requests as the device library does (one chain per edge)."""

    account: LocalAccount
    world: LedgerWorld
    seq: int = 0
    prev: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def address(self) -> bytes:
        return bytes.fromhex(self.account.address[2:])

    def request(
        self,
        edge: LocalAccount,
        deadline: int,
        *,
        task_id: bytes | None = None,
        tag: bytes | None = None,
        prev: bytes | None = None,
    ) -> Item:
        edge_b = bytes.fromhex(edge.address[2:])
        self.seq += 1
        input_c = keccak256(b"in" + (tag or self.address + self.seq.to_bytes(8, "big")))
        request = TaskRequest(
            task_id or task_id_for(self.address, input_c), self.address, self.seq,
            keccak256(b"model"), 3, input_c, edge_b, deadline,
            self.prev.get(edge_b, bytes(32)) if prev is None else prev,
        )  # fmt: skip
        self.prev[edge_b] = request.struct_hash()
        return Item(request, request.sign(bytes(self.account.key), self.world.ledger.domain))


async def anchor(
    world: LedgerWorld, edge: LocalAccount, items: list[Item], *, calldata: bytes | None = None
) -> int:
    """Anchor ``items`` as the edge's next batch (root over their results); its batch id.
    ``calldata`` replaces the records the transaction publishes (a Byzantine edge)."""
    ledger = world.ledger
    state = await ledger.edge_state(edge.address)
    records = []
    for i, item in enumerate(items):
        result = TaskResult(
            item.request.task_id, item.request.struct_hash(), keccak256(item.output),
            world.measurement, item.quote_id or world.quote_id, 0, 7, state.next_seq + i,
        )  # fmt: skip
        records.append(AnchoredRecord(item.request, result, item.sig))
    edge_b = bytes.fromhex(edge.address[2:])
    data = encode_batch(BatchRecords(edge_b, state.next_seq, tuple(records)))
    tree = world.tree([r.result for r in records])
    await ledger.anchor_batch(
        edge, state.next_batch_id, tree.root, state.next_seq, len(records), state.head,
        data if calldata is None else calldata,
    )  # fmt: skip
    return int(state.next_batch_id)


@pytest.fixture
async def world() -> AsyncIterator[LedgerWorld]:
    async with open_ledger("inprocess") as ledger:
        yield await ledger_world(ledger, edges=2, devices=2)


async def _index(world: LedgerWorld, grace: int = 3600) -> AuditIndex:
    index = AuditIndex(":memory:", world.ledger.domain, grace_seconds=grace)
    await index.sync(world.ledger, [e.address for e in world.edges])
    return index


def _codes(index: AuditIndex, item: Item) -> list[str]:
    (task,) = index.show(item.request.task_id, item.request.device)
    return [str(f.code) for f in task.findings]


async def _deadline(world: LedgerWorld, ahead: int = 600) -> int:
    return await world.ledger.timestamp() + ahead


async def test_an_honest_chain_has_no_findings(world: LedgerWorld) -> None:
    a, b = (Device(d, world) for d in world.devices)
    edge0, edge1 = world.edges
    deadline = await _deadline(world)
    # chains span batches; both devices use both edges; one task goes to two edges (redundancy)
    first = [a.request(edge0, deadline), b.request(edge0, deadline), a.request(edge0, deadline)]
    await anchor(world, edge0, first)
    redundant = keccak256(b"redundant")
    second = [
        a.request(edge0, deadline),
        b.request(edge0, deadline),
        a.request(edge0, deadline, task_id=redundant, tag=b"same"),
    ]
    await anchor(world, edge0, second)
    other = [
        b.request(edge1, deadline),
        a.request(edge1, deadline, task_id=redundant, tag=b"same"),
        b.request(edge1, deadline),
    ]
    await anchor(world, edge1, other)
    with await _index(world) as index:
        tasks = index.tasks()
        assert len(tasks) == 9
        assert all(t.anchored_at > 0 for t in tasks)
        for task in tasks:
            verified = await index.verify_task(task, world.ledger)
            assert verified.findings == ()
            assert task.findings == ()
            assert task.as_json()["findings"] == []
        assert index.batch_findings() == []
        assert len(index.show(redundant)) == 2  # one task, two edges: not a replay


async def test_replayed_request_in_one_batch_across_batches_and_under_one_task_id(
    world: LedgerWorld,
) -> None:
    a, b = (Device(d, world) for d in world.devices)
    edge0, edge1 = world.edges
    deadline = await _deadline(world)
    once, twice, honest = (a.request(edge0, deadline) for _ in range(3))
    # the same signed request twice in one batch, with another output
    await anchor(world, edge0, [once, twice, Item(twice.request, twice.sig, output=b"other")])
    # ... and again in a later batch, with the same output
    await anchor(world, edge0, [honest, once])
    # another request (new device seq) under a task id the device already used at this edge
    again = b.request(edge1, deadline, tag=b"x")
    retry = b.request(edge1, deadline, tag=b"x")
    assert retry.request.task_id == again.request.task_id
    await anchor(world, edge1, [again])
    await anchor(world, edge1, [Item(retry.request, retry.sig, output=b"changed")])
    with await _index(world) as index:
        assert _codes(index, honest) == []
        tasks = index.show(twice.request.task_id)
        assert [t.record.result.edge_seq for t in tasks] == [1, 2]
        for task in tasks:
            (finding,) = (await index.verify_task(task, None)).findings
            assert finding.code == FindingCode.REPLAYED_REQUEST
            assert "same signed request" in finding.message
            assert "another output" in finding.message
        for task in index.show(once.request.task_id):  # seq 0 and seq 4
            assert [f.code for f in task.findings] == [FindingCode.REPLAYED_REQUEST]
            assert "another output" not in task.findings[0].message
        for task in index.show(again.request.task_id):
            (finding,) = task.findings
            assert finding.code == FindingCode.REPLAYED_REQUEST
            assert "another request of this task" in finding.message


async def test_device_not_registered_at_anchoring(world: LedgerWorld) -> None:
    ledger, admin = world.ledger, world.admin
    edge = world.edges[0]
    registered, revoked = (Device(d, world) for d in world.devices)
    stranger = Device(Account.from_key(keccak256(b"stranger")), world)
    late = Device(Account.from_key(keccak256(b"late joiner")), world)
    deadline = await _deadline(world)
    await ledger.revoke_device(admin, revoked.account)
    items = [
        registered.request(edge, deadline),
        revoked.request(edge, deadline),
        stranger.request(edge, deadline),
        late.request(edge, deadline),
    ]
    await anchor(world, edge, items)
    # registered after the batch: history, not today's registry, decides
    await ledger.register_device(admin, world.party_id, late.account)
    await ledger.revoke_device(admin, registered.account)  # revoked after: fine
    with await _index(world) as index:
        assert _codes(index, items[0]) == []
        for item, text in ((items[1], "revoked at block"), (items[2], "never registered")):
            (task,) = index.show(item.request.task_id)
            (finding,) = task.findings
            assert finding.code == FindingCode.DEVICE_NOT_REGISTERED
            assert text in finding.message
            await index.verify_task(task, ledger)  # the signature holds: a finding, not a failure
        assert _codes(index, items[3]) == ["device-not-registered"]
    # a device registered again before a later batch is fine there
    await ledger.register_device(admin, world.party_id, revoked.account)
    back = revoked.request(edge, deadline)
    await anchor(world, edge, [back])
    with await _index(world) as index:
        assert _codes(index, back) == []
        assert _codes(index, items[1]) == ["device-not-registered"]


async def test_quote_id_mismatch_against_the_registration_at_anchoring(world: LedgerWorld) -> None:
    ledger = world.ledger
    edge = world.edges[0]
    device = Device(world.devices[0], world)
    deadline = await _deadline(world)
    honest = device.request(edge, deadline)
    forged = device.request(edge, deadline)
    forged.quote_id = keccak256(b"another quote")
    await anchor(world, edge, [honest, forged])
    # the edge re-attests with a new quote id: its history stays valid, new batches use the new
    new_quote = keccak256(b"new quote")
    await ledger.register_edge(
        world.admin, world.party_id, edge, world.measurement, new_quote, "127.0.0.1:9000"
    )
    stale = device.request(edge, deadline)
    fresh = device.request(edge, deadline)
    fresh.quote_id = new_quote
    await anchor(world, edge, [stale, fresh])
    with await _index(world) as index:
        assert _codes(index, honest) == []
        assert _codes(index, fresh) == []
        for item in (forged, stale):
            (task,) = index.show(item.request.task_id)
            (finding,) = task.findings
            assert finding.code == FindingCode.QUOTE_ID_MISMATCH
            assert (item.quote_id or world.quote_id).hex() in finding.message


async def test_late_anchoring_after_deadline_and_grace(world: LedgerWorld) -> None:
    ledger = world.ledger
    edge = world.edges[0]
    device = Device(world.devices[0], world)
    now = await ledger.timestamp()
    on_time = device.request(edge, now + 600)
    in_grace = device.request(edge, now + 10)
    late = device.request(edge, now + 10)
    await anchor(world, edge, [on_time])
    await ledger.advance_time(100)
    await anchor(world, edge, [in_grace])
    await ledger.advance_time(3600)
    await anchor(world, edge, [late])
    with await _index(world) as index:
        assert _codes(index, on_time) == []
        assert _codes(index, in_grace) == []  # 90 s after its deadline, within 3600 s
        (task,) = index.show(late.request.task_id)
        (finding,) = (await index.verify_task(task, ledger)).findings
        assert finding.code == FindingCode.LATE_ANCHORING
        assert f"deadline {now + 10}" in finding.message
    with await _index(world, grace=0) as strict:
        assert _codes(strict, in_grace) == ["late-anchoring"]
        assert _codes(strict, on_time) == []
    with await _index(world, grace=10**6) as lenient:
        assert _codes(lenient, late) == []


async def test_gaps_in_a_device_request_chain(world: LedgerWorld) -> None:
    edge0, edge1 = world.edges
    a, b = (Device(d, world) for d in world.devices)
    deadline = await _deadline(world)
    # a's chain: r1 never anchored, r2 names it -> gap; chains across batches are fine
    r0 = a.request(edge0, deadline)
    r1 = a.request(edge0, deadline)
    r2 = a.request(edge0, deadline)
    r3 = a.request(edge0, deadline)
    assert r2.request.prev_request == r1.request.struct_hash()
    await anchor(world, edge0, [r0])
    await anchor(world, edge0, [r2, r3])
    # b's chain: a request names a predecessor at another edge that comes later in the sync
    # order, and a predecessor anchored in a later batch of the same edge: both resolve
    first = b.request(edge1, deadline)
    second = b.request(edge0, deadline, prev=first.request.struct_hash())
    x1 = b.request(edge0, deadline)
    x2 = b.request(edge0, deadline)
    await anchor(world, edge0, [second, x2])
    await anchor(world, edge0, [x1])
    await anchor(world, edge1, [first])
    # a request that names a hash no device ever sent, under another device's request
    foreign = b.request(edge0, deadline, prev=r0.request.struct_hash())
    await anchor(world, edge0, [foreign])
    with await _index(world) as index:
        assert _codes(index, r0) == []
        assert _codes(index, r3) == []  # continues r2 in the same batch
        (task,) = index.show(r2.request.task_id)
        (finding,) = task.findings
        assert finding.code == FindingCode.REQUEST_CHAIN_GAP
        assert r1.request.struct_hash().hex() in finding.message
        for item in (second, x1, x2, first):
            assert _codes(index, item) == [], item
        assert _codes(index, foreign) == ["request-chain-gap"]  # r0 is a's, not b's
    # indexed edge by edge in the other order, and incrementally: the same findings
    index = AuditIndex(":memory:", world.ledger.domain)
    await index.sync(world.ledger, [world.edges[0].address])
    assert _codes(index, second) == ["request-chain-gap"]  # its predecessor is not indexed yet
    await index.sync(world.ledger, [world.edges[1].address])
    assert _codes(index, second) == []
    assert _codes(index, r2) == ["request-chain-gap"]
    index.close()


async def test_task_ids_are_scoped_by_device(world: LedgerWorld) -> None:
    edge = world.edges[0]
    a, b = (Device(d, world) for d in world.devices)
    deadline = await _deadline(world)
    shared = keccak256(b"one id, two devices")
    items = [a.request(edge, deadline, task_id=shared), b.request(edge, deadline, task_id=shared)]
    await anchor(world, edge, items)
    with await _index(world) as index:
        both = index.show(shared)
        assert [t.record.request.device for t in both] == sorted([a.address, b.address])
        assert all(t.findings == () for t in both)  # two tasks, not a replay
        (only_b,) = index.show(shared, b.address)
        assert only_b.record.request.device == b.address
        (verified,) = await index.verify(shared, world.ledger, device=a.address)
        assert verified.task.record.request.device == a.address
        assert index.show(shared, b"\x00" * 20) == []


async def test_bad_batches_are_findings_and_the_rest_is_audited(world: LedgerWorld) -> None:
    ledger = world.ledger
    edge0, edge1 = world.edges
    device = Device(world.devices[0], world)
    deadline = await _deadline(world)
    good = [device.request(edge0, deadline, prev=bytes(32)) for _ in range(7)]
    other = device.request(edge1, deadline)
    edge0_b, edge1_b = (bytes.fromhex(e.address[2:]) for e in world.edges)
    await anchor(world, edge0, [good[0]])
    await anchor(world, edge0, [good[1]], calldata=b"\x02 not a batch")  # malformed
    canonical = _reencoded(world, good[2], edge0_b, 2)
    await anchor(world, edge0, [good[2]], calldata=_explicit_task_id(canonical, good[2]))
    await anchor(world, edge0, [good[3]], calldata=_reencoded(world, good[4], edge0_b, 3))
    await anchor(world, edge0, [good[4], good[5]], calldata=_reencoded(world, good[4], edge0_b, 4))
    names_edge1 = _reencoded(world, good[5], edge0_b, 6)
    names_edge1 = names_edge1[:2] + edge1_b + names_edge1[22:]  # the header's edge
    await anchor(world, edge0, [good[5]], calldata=names_edge1)
    await anchor(world, edge0, [good[6]])
    await anchor(world, edge1, [other])
    with await _index(world) as index:
        found = {(f.batch_id, f.code) for f in index.batch_findings()}
        assert found == {
            (1, FindingCode.BATCH_MALFORMED),
            (2, FindingCode.BATCH_NON_CANONICAL),
            (3, FindingCode.BATCH_ROOT_MISMATCH),
            (4, FindingCode.BATCH_RANGE_MISMATCH),
            (5, FindingCode.BATCH_WRONG_EDGE),
        }
        assert all(f.edge == edge0_b for f in index.batch_findings())
        assert index.batch_findings(edge1_b) == []
        indexed = index.tasks()
        assert {t.record.result.edge_seq for t in indexed if t.edge == edge0_b} == {0, 7}
        assert {t.edge for t in indexed} == {edge0_b, edge1_b}
        for task in indexed:
            await index.verify_task(task, ledger)
        # a later sync resumes after the bad batches and does not retry them
        assert await index.sync(ledger, [e.address for e in world.edges]) == 0
        assert len(index.batch_findings()) == 5


async def test_a_batch_not_anchored_by_a_direct_call_is_a_finding(world: LedgerWorld) -> None:
    edge = world.edges[0]
    device = Device(world.devices[0], world)
    deadline = await _deadline(world)
    items = [device.request(edge, deadline) for _ in range(3)]
    for item in items:
        await anchor(world, edge, [item])

    class Indirect:
        """The client's answer for a batch whose transaction called another contract."""

        def __init__(self, ledger: LedgerClient) -> None:
            self.inner = ledger
            self.chain_id, self.address = ledger.chain_id, ledger.address

        async def edge_state(self, addr: object) -> object:
            return await self.inner.edge_state(addr)

        async def batch(self, addr: object, batch_id: int) -> object:
            return await self.inner.batch(addr, batch_id)

        async def batch_calldata(self, addr: object, batch_id: int) -> bytes:
            if batch_id == 1:
                raise LedgerError(f"batch {batch_id}: not anchored by a direct call")
            return await self.inner.batch_calldata(addr, batch_id)

    from secure_ci.ledger._audit_chain import ChainHistory

    index = AuditIndex(":memory:", world.ledger.domain)
    history = ChainHistory(world.ledger)
    assert await index.sync(Indirect(world.ledger), [edge.address], history=history) == 2
    (finding,) = index.batch_findings()
    assert (finding.code, finding.batch_id) == (FindingCode.BATCH_NOT_DIRECT_CALL, 1)
    assert _codes(index, items[0]) == []
    # chained over the batch that could not be read: the auditor never saw its predecessor
    assert _codes(index, items[2]) == ["request-chain-gap"]
    index.close()


async def test_a_failing_node_stops_the_sync_without_findings(world: LedgerWorld) -> None:
    edge = world.edges[0]
    device = Device(world.devices[0], world)
    await anchor(world, edge, [device.request(edge, await _deadline(world))])

    class Down:
        chain_id, address = world.ledger.chain_id, world.ledger.address

        async def edge_state(self, addr: object) -> object:
            return await world.ledger.edge_state(addr)

        async def batch(self, addr: object, batch_id: int) -> object:
            return await world.ledger.batch(addr, batch_id)

        async def batch_calldata(self, addr: object, batch_id: int) -> bytes:
            raise ChainError("connection refused")

    index = AuditIndex(":memory:", world.ledger.domain)
    with pytest.raises(ChainError):
        await index.sync(Down(), [edge.address], history=None)
    assert index.batch_findings() == []
    assert index.count() == 0
    assert await index.sync(world.ledger, [edge.address]) == 1  # resumes where it stopped
    index.close()


async def test_a_forged_record_still_fails_verification(world: LedgerWorld) -> None:
    """Findings never replace verification: a record the device did not sign raises."""
    edge = world.edges[0]
    device = Device(world.devices[0], world)
    item = device.request(edge, await _deadline(world))
    item.sig = Device(world.devices[1], world).request(edge, 0).sig
    await anchor(world, edge, [item])
    with await _index(world) as index:
        (task,) = index.show(item.request.task_id)
        with pytest.raises(SignatureError):
            await index.verify_task(task, world.ledger)


def _result(world: LedgerWorld, item: Item, seq: int) -> TaskResult:
    return TaskResult(
        item.request.task_id, item.request.struct_hash(), keccak256(item.output),
        world.measurement, item.quote_id or world.quote_id, 0, 7, seq,
    )  # fmt: skip


def _reencoded(world: LedgerWorld, item: Item, edge: bytes, seq: int) -> bytes:
    """Canonical calldata of one record at ``seq`` (wrong for any other batch)."""
    record = AnchoredRecord(item.request, _result(world, item, seq), item.sig)
    return encode_batch(BatchRecords(edge, seq, (record,)))


def _explicit_task_id(calldata: bytes, item: Item) -> bytes:
    """The one-record batch with its default task id spelled out: it decodes to the same
    record, but is not the canonical encoding (which leaves a default task id out)."""
    tables = 34 + 2 + 20 + 2 + 32 + 2 + 64  # header, one device, one model, one enclave
    kind = calldata[tables]
    assert kind == 1 | 4  # chain start, signed
    body_end = tables + 1 + 34 + 91
    assert item.request.task_id == task_id_for(item.request.device, item.request.input_commitment)
    return (
        calldata[:tables] + bytes((kind | 2,)) + calldata[tables + 1 : body_end]
        + item.request.task_id + calldata[body_end:]
    )  # fmt: skip
