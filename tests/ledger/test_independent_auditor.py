"""An auditor written from docs/ledger-format.md alone (``independent_auditor`` and
``independent_format``: no secure-ci imports) agrees with ``AuditIndex`` (what ``secure-ci
audit verify --all`` runs) on every task and batch of a chain built here with secure-ci:
several edges and devices, honest records and tampered ones (forged calldata, replayed
requests, unregistered and revoked devices, a forged device signature, a wrong measurement,
a tree with leaves at the wrong positions, late anchoring, request-chain gaps, an edge that
anchored another result than it signed to a challenger or refused a request it anchored, and
a batch proven fraudulent on chain)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hypothesis import given, settings
from hypothesis import strategies as st
from independent_auditor import Audit, audit, check_records
from independent_format import (
    Malformed,
    decode,
    encode,
    leaf,
    merkle_levels,
    proof_of,
    root_from_proof,
    separator,
)

from secure_ci.exceptions import SecureCIError
from secure_ci.ledger import open_ledger
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._calldata import AnchoredRecord, BatchRecords, decode_batch, encode_batch
from secure_ci.ledger._client import LedgerClient
from secure_ci.ledger._findings import BadBatch, check_batch
from secure_ci.ledger._integrity import REFUSAL_NOT_RECEIVED, refusal_digest
from secure_ci.ledger._merkle import MerkleTree, leaf_hash
from secure_ci.ledger._records import (
    LedgerDomain,
    TaskRequest,
    TaskResult,
    keccak256,
    sign_digest,
    task_id_for,
)
from secure_ci.testing import LedgerWorld, ledger_world, sample_tasks

pytestmark = pytest.mark.slow

Mutation = Callable[[bytes], bytes]


@dataclass
class Item:
    """A device-signed request and what the edge answers for it."""

    request: TaskRequest
    sig: bytes
    output: bytes = b"out"
    quote_id: bytes | None = None
    measurement: bytes | None = None


@dataclass
class Device:
    """Chains its requests per edge, as the device library does."""

    account: LocalAccount
    world: LedgerWorld
    seq: int = 0
    prev: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def address(self) -> bytes:
        return bytes.fromhex(self.account.address[2:])

    def request(
        self, edge: LocalAccount, deadline: int, *, task_id: bytes | None = None, tag: bytes = b""
    ) -> Item:
        edge_b = bytes.fromhex(edge.address[2:])
        self.seq += 1
        input_c = keccak256(b"in" + (tag or self.address + self.seq.to_bytes(8, "big")))
        request = TaskRequest(
            task_id or task_id_for(self.address, input_c), self.address, self.seq,
            keccak256(b"model"), 3, input_c, edge_b, deadline, self.prev.get(edge_b, bytes(32)),
        )  # fmt: skip
        self.prev[edge_b] = request.struct_hash()
        return Item(request, request.sign(bytes(self.account.key), self.world.ledger.domain))


def _records(world: LedgerWorld, items: list[Item], first_seq: int) -> list[AnchoredRecord]:
    return [
        AnchoredRecord(
            item.request,
            TaskResult(
                item.request.task_id,
                item.request.struct_hash(),
                keccak256(item.output),
                item.measurement or world.measurement,
                item.quote_id or world.quote_id,
                0,
                7,
                first_seq + i,
            ),
            item.sig,
        )
        for i, item in enumerate(items)
    ]


async def _anchor_records(
    world: LedgerWorld,
    edge: LocalAccount,
    build: Callable[[int], list[AnchoredRecord]],
    mutate: Mutation | None = None,
    *,
    swap_leaves: bool = False,
) -> int:
    """Anchor ``build(first_seq)`` as the edge's next batch (root over their results); its
    batch id. ``mutate`` changes the published calldata; ``swap_leaves`` puts the first two
    leaves at each other's positions in the anchored tree."""
    ledger = world.ledger
    state = await ledger.edge_state(edge.address)
    records = build(state.next_seq)
    edge_b = bytes.fromhex(edge.address[2:])
    data = encode_batch(BatchRecords(edge_b, state.next_seq, tuple(records)))
    leaves = [leaf_hash(r.result.edge_seq, r.result.digest(ledger.domain)) for r in records]
    if swap_leaves:
        leaves[0], leaves[1] = leaves[1], leaves[0]
    root = MerkleTree.build(leaves).root
    await ledger.anchor_batch(
        edge, state.next_batch_id, root, state.next_seq, len(records), state.head,
        data if mutate is None else mutate(data),
    )  # fmt: skip
    return int(state.next_batch_id)


async def _anchor(
    world: LedgerWorld,
    edge: LocalAccount,
    items: list[Item],
    mutate: Mutation | None = None,
    *,
    swap_leaves: bool = False,
) -> int:
    def build(first_seq: int) -> list[AnchoredRecord]:
        return _records(world, items, first_seq)

    return await _anchor_records(world, edge, build, mutate, swap_leaves=swap_leaves)


def _first_record(calldata: bytes) -> int:
    pos = 34 + (36 if calldata[1] & 1 else 0)
    for width in (20, 32, 64):
        pos += 2 + width * int.from_bytes(calldata[pos : pos + 2], "big")
    return pos


def _flip(offset_in_body: int) -> Mutation:
    def go(data: bytes) -> bytes:
        first = _first_record(data)
        pos = first + 1 + (34 if data[first] & 1 else 2) + offset_in_body
        return data[:pos] + bytes([data[pos] ^ 1]) + data[pos + 1 :]

    return go


def _kind_bit(data: bytes) -> bytes:
    first = _first_record(data)
    return data[:first] + bytes([data[first] | 8]) + data[first + 1 :]


def _explicit_default_id(data: bytes) -> bytes:
    """One chain-start record with its default task id written out (non-canonical)."""
    batch = decode_batch(data)
    request = batch.records[0].request
    first = _first_record(data)
    end = first + 1 + 34 + 91
    return (
        data[:first]
        + bytes([data[first] | 2])
        + data[first + 1 : end]
        + request.task_id
        + data[end:]
    )


def _other_edge(edge: LocalAccount) -> Mutation:
    return lambda data: data[:2] + bytes.fromhex(edge.address[2:]) + data[22:]


def _shifted(world: LedgerWorld, edge: LocalAccount, item: Item, by: int) -> Mutation:
    def go(data: bytes) -> bytes:
        seq = decode_batch(data).first_seq + by
        (record,) = _records(world, [item], seq)
        return encode_batch(BatchRecords(bytes.fromhex(edge.address[2:]), seq, (record,)))

    return go


async def _reference(
    ledger: LedgerClient,
) -> tuple[dict[tuple[bytes, int], tuple[bool, frozenset[str]]], dict[tuple[bytes, int], str]]:
    """What ``secure-ci audit verify --all`` sees: per task (verified?, finding codes), and
    per bad batch its finding code."""
    edges = sorted({str(ev.edge) for ev in await ledger.batches()})
    with AuditIndex(":memory:", ledger.domain) as index:
        await index.sync(ledger, edges)
        tasks = {}
        for task in index.tasks(limit=1 << 62):
            try:
                await index.verify_task(task, None)
                ok = True
            except SecureCIError:
                ok = False
            codes = frozenset(str(f.code) for f in task.findings)
            tasks[(task.edge, task.record.result.edge_seq)] = (ok, codes)
        batches = {(f.edge, f.batch_id): str(f.code) for f in index.batch_findings()}
    return tasks, batches


async def _build(world: LedgerWorld) -> tuple[bytes, int, int]:
    """The tampered chain; returns the batch proven fraudulent (edge, batch id, fault)."""
    ledger = world.ledger
    edge0, edge1, edge2 = world.edges
    a, b, c = (Device(d, world) for d in world.devices)
    stranger = Device(Account.from_key(keccak256(b"independent stranger")), world)
    far = await ledger.timestamp() + 10**6
    # edge0: chains across batches, a task also sent to edge2 (not a replay), replays
    redundant = keccak256(b"independent redundant")
    await _anchor(
        world, edge0, [a.request(edge0, far), b.request(edge0, far), a.request(edge0, far)]
    )
    once, twice = a.request(edge0, far), a.request(edge0, far)
    same = a.request(edge0, far, task_id=redundant, tag=b"same")
    await _anchor(
        world, edge0, [once, twice, Item(twice.request, twice.sig, output=b"other"), same]
    )
    await _anchor(world, edge2, [a.request(edge2, far, task_id=redundant, tag=b"same")])
    # a chain of 40 in one batch (signatures kept at the end and at depth 31), a wrong quote
    chain40 = [a.request(edge0, far) for _ in range(40)]
    quoted = b.request(edge0, far)
    quoted.quote_id = keccak256(b"another quote")
    await _anchor(world, edge0, [once, *chain40, quoted])
    # registry: a revoked device, one never registered; a gap; a forged signature; a wrong
    # measurement
    await ledger.revoke_device(world.admin, c.account)
    skipped = b.request(edge0, far)
    gap = b.request(edge0, far)
    assert gap.request.prev_request == skipped.request.struct_hash()
    forged = a.request(edge0, far)
    forged.sig = b.request(edge2, far).sig
    measured = c.request(edge0, far)
    measured.measurement = keccak256(b"another measurement")
    await _anchor(world, edge0, [c.request(edge0, far), stranger.request(edge0, far), gap, forged])
    await _anchor(world, edge0, [measured])
    # equivocation: edge0's enclave signed another result for a seq it anchored (a device
    # filed it in a challenge), and a refusal ("never received") of a request it anchored;
    # next to an honest challenge (what was anchored) and an honest refusal (never anchored)
    signed_twice, refused, plain = (a.request(edge0, far), b.request(edge0, far),
                                    a.request(edge0, far))  # fmt: skip
    never = a.request(edge0, far)
    seq = (await ledger.edge_state(edge0.address)).next_seq
    await _anchor(world, edge0, [signed_twice, refused, plain])
    twice, _, honest_result = (
        r.result for r in _records(world, [signed_twice, refused, plain], seq)
    )
    shown = replace(twice, output_commitment=keccak256(b"shown to the device"))
    # the enclave also signed another result of `refused`'s request for a far seq: the
    # challenge's calldata names the request
    elsewhere = replace(
        _records(world, [refused], seq + 1)[0].result, output_commitment=keccak256(b"far"),
        edge_seq=seq + 1000,
    )  # fmt: skip
    for result in (shown, honest_result, elsewhere):
        await ledger.challenge(a.account, result, world.sign(edge0, result))
    for device, item in ((b, refused), (a, never)):
        challenge_id = await ledger.challenge_request(device.account, item.request, item.sig)
        digest = refusal_digest(ledger.domain, item.request.struct_hash(), REFUSAL_NOT_RECEIVED)
        await ledger.refuse_request(
            edge0, challenge_id, REFUSAL_NOT_RECEIVED, sign_digest(bytes(edge0.key), digest)
        )
    # edge1: bad batches of every kind, each followed by honest ones
    honest = sample_tasks(
        12, edge_key=bytes(edge1.key), domain=ledger.domain, devices=3, seed=7,
        measurement=world.measurement, quote_id=world.quote_id,
    )  # fmt: skip
    await _anchor_records(world, edge1, lambda _: [e.anchored() for e in honest])
    bad: list[tuple[Item | None, Mutation | None, bool]] = [
        (None, lambda _: b"\x02 not a batch", False),
        (None, _kind_bit, False),
        (None, lambda d: d + b"\x00", False),
        (None, lambda d: d[:-1], False),
        (None, _explicit_default_id, False),
        (None, _flip(52), False),  # an output commitment: root mismatch
        (None, _other_edge(edge0), False),
        (b.request(edge1, far), None, True),  # leaves at each other's positions
    ]
    for item, mutate, swap in bad:
        items = [item or b.request(edge1, far)]
        if swap:
            items.append(b.request(edge1, far))
        await _anchor(world, edge1, items, mutate, swap_leaves=swap)
    shifted = c.request(edge1, far)
    await _anchor(world, edge1, [shifted], _shifted(world, edge1, shifted, 3))
    await _anchor(world, edge1, [b.request(edge1, far), a.request(edge1, far)])
    # late anchoring: a deadline already past plus the grace when its batch is anchored
    soon = a.request(edge2, await ledger.timestamp() + 10)
    await ledger.advance_time(4000)
    await _anchor(world, edge2, [soon, b.request(edge2, far)])
    # edge2 publishes forged calldata; anyone proves it on chain
    target = await _anchor(world, edge2, [a.request(edge2, far)], _flip(52))
    data = await ledger.batch_calldata(edge2.address, target)
    fault = await ledger.prove_fraud(world.devices[0], edge2.address, target, data)
    return bytes.fromhex(edge2.address[2:]), target, int(fault)


async def test_the_independent_auditor_agrees_with_audit_verify() -> None:
    async with open_ledger("inprocess") as ledger:
        world = await ledger_world(ledger, edges=3, devices=3, seed=31)
        edge, batch_id, fault = await _build(world)
        reference_tasks, reference_batches = await _reference(ledger)
        found: Audit = await audit(ledger._w3, bytes.fromhex(ledger.address[2:]))
        ours = {key: (v.accepted, v.codes) for key, v in found.tasks.items()}
        assert ours == reference_tasks
        assert found.batch_findings == reference_batches
        # the chain exercises every rule the document specifies (not an empty agreement)
        codes = {code for _, task_codes in ours.values() for code in task_codes}
        assert codes == {
            "replayed-request", "device-not-registered", "quote-id-mismatch", "late-anchoring",
            "request-chain-gap", "challenge-equivocation", "refusal-equivocation",
        }  # fmt: skip
        equivocations = [
            code for _, task_codes in ours.values() for code in task_codes if "equivocation" in code
        ]
        assert sorted(equivocations) == [
            "challenge-equivocation", "challenge-equivocation", "refusal-equivocation",
        ]  # fmt: skip
        assert set(reference_batches.values()) == {
            "batch-malformed", "batch-non-canonical", "batch-wrong-edge",
            "batch-range-mismatch", "batch-root-mismatch",
        }  # fmt: skip
        rejected = sorted(v.reason for v in found.tasks.values() if not v.accepted)
        assert rejected == ["device signature", "measurement"]
        assert sum(1 for ok, codes in ours.values() if ok and not codes) >= 30
        assert found.frauds == {(edge, batch_id): fault}
        assert fault == 9
        assert found.batch_findings[(edge, batch_id)] == "batch-root-mismatch"
        # the positional proofs the document describes are the contract's
        await _check_proofs(ledger, found)


async def _check_proofs(ledger: LedgerClient, found: Audit) -> None:
    for (edge, seq), (batch_id, proof, record_hash) in list(found.proofs.items())[::7]:
        addr = "0x" + edge.hex()
        assert await ledger.verify_task(addr, batch_id, seq, record_hash, proof)
        info = await ledger.batch(addr, batch_id)
        if info.count > 1:  # the proof of a neighbour's position proves nothing here
            assert not await ledger.verify_task(addr, batch_id, seq ^ 1, record_hash, proof)


def test_tree_and_codec_match_the_package() -> None:
    """The document's tree, proofs and calldata codec against the package's on sample data."""
    domain = LedgerDomain(31337, b"\x42" * 20)
    entries = sample_tasks(70, edge_key=b"\x07" * 32, domain=domain, devices=3, seed=3)
    records = tuple(e.anchored() for e in entries)
    data = encode_batch(BatchRecords(records[0].request.edge, 0, records, (b"\x09" * 32, 4)))
    decoded = decode(data)
    assert encode(decoded) == data
    assert decoded.epoch_link == (b"\x09" * 32, 4)
    assert [r.result.struct_hash() for r in decoded.records] == [
        r.result.struct_hash() for r in records
    ]
    assert [bool(r.device_sig) for r in decoded.records] == [
        bool(r.device_sig) for r in decode_batch(data).records
    ]
    for n in (1, 2, 3, 5, 8, 13):
        leaves = [leaf(i, keccak256(bytes([i]))) for i in range(n)]
        assert leaves == [leaf_hash(i, keccak256(bytes([i]))) for i in range(n)]
        levels = merkle_levels(leaves)
        tree = MerkleTree.build(leaves)
        assert levels[-1][0] == tree.root
        for i in range(n):
            assert proof_of(levels, i) == tree.proof(i)
            assert root_from_proof(leaves[i], proof_of(levels, i), i, n) == tree.root
            if n > 1:
                assert root_from_proof(leaves[i], proof_of(levels, i), i ^ 1, n) != tree.root
    for broken in (data[:-1], data + b"\x00", b"\x03" + data[1:], data[:33]):
        with pytest.raises(Malformed):
            decode(broken)


_DOMAIN = LedgerDomain(31337, b"\x42" * 20)
_SAMPLE = tuple(
    e.anchored() for e in sample_tasks(9, edge_key=b"\x05" * 32, domain=_DOMAIN, devices=3, seed=9)
)
_EDGE = _SAMPLE[0].request.edge
_CALLDATA = encode_batch(BatchRecords(_EDGE, 0, _SAMPLE))
_ROOT = MerkleTree.build(
    [leaf_hash(r.result.edge_seq, r.result.digest(_DOMAIN)) for r in _SAMPLE]
).root


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["flip", "truncate", "append", "splice"]),
    st.integers(0, 1 << 16),
    st.binary(min_size=1, max_size=40),
)
def test_damaged_calldata_gets_the_package_finding(how: str, where: int, data: bytes) -> None:
    """Random damage to honest calldata: the document's batch rules (section 6.1) give the
    finding the package's auditor gives, or none when it gives none."""
    pos = where % len(_CALLDATA)
    bad = {
        "flip": _CALLDATA[:pos] + bytes([_CALLDATA[pos] ^ (data[0] or 1)]) + _CALLDATA[pos + 1 :],
        "truncate": _CALLDATA[:pos],
        "append": _CALLDATA + data,
        "splice": _CALLDATA[:pos] + data + _CALLDATA[pos + len(data) :],
    }[how]
    sep = separator(_DOMAIN.chain_id, _DOMAIN.contract)
    ours = check_records(bad, _EDGE, _ROOT, 0, len(_SAMPLE), sep)
    theirs = check_batch(_DOMAIN, _EDGE, bad, _ROOT, 0, len(_SAMPLE))
    expected = str(theirs.code) if isinstance(theirs, BadBatch) else None
    assert (ours if isinstance(ours, str) else None) == expected
