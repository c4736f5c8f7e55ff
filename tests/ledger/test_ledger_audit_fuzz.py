"""Property tests of the audit index: hostile calldata never blocks a sync, registry logs
parse strictly, and request-chain gaps are exactly the missing links whatever the batching
and the sync order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import replace

from eth_account import Account
from hypothesis import event, given
from hypothesis import strategies as st

from secure_ci.exceptions import ChainError, SecureCIError
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._audit_chain import DEVICE, EDGE, registry_event
from secure_ci.ledger._calldata import BatchRecords, encode_batch
from secure_ci.ledger._findings import FindingCode
from secure_ci.ledger._journal import JournalEntry, sign_entry
from secure_ci.ledger._merkle import MerkleTree, leaf_hash
from secure_ci.ledger._records import Signer, keccak256
from secure_ci.testing import MemoryLedger, sample_tasks

KEYS = (keccak256(b"fuzz edge a"), keccak256(b"fuzz edge b"))
EDGES = tuple(Account.from_key(k) for k in KEYS)
DOMAIN = MemoryLedger().domain
ENTRIES = tuple(
    tuple(sample_tasks(24, edge_key=k, domain=DOMAIN, devices=4, seed=i))
    for i, k in enumerate(KEYS)
)
BATCH_CODES = {c for c in FindingCode if c.startswith("batch-")}


def _edge(i: int) -> bytes:
    return bytes.fromhex(EDGES[i].address[2:])


def _root_and_calldata(entries: list[JournalEntry], first: int) -> tuple[bytes, bytes]:
    records = [e.anchored() for e in entries]
    tree = MerkleTree.build([leaf_hash(e.result.edge_seq, e.record_hash) for e in entries])
    return tree.root, encode_batch(BatchRecords(entries[0].request.edge, first, tuple(records)))


def _renumbered(entries: list[JournalEntry], first: int = 0) -> list[JournalEntry]:
    """The entries as the edge numbers them from ``first`` (results re-signed)."""
    signer = Signer(KEYS[0])
    return [
        sign_entry(e.request, e.device_sig, replace(e.result, edge_seq=first + i), signer, DOMAIN)
        for i, e in enumerate(entries)
    ]


async def _anchor(
    ledger: MemoryLedger, i: int, entries: list[JournalEntry], data: bytes = b""
) -> None:
    state = await ledger.edge_state(EDGES[i].address)
    root, calldata = _root_and_calldata(entries, state.next_seq)
    await ledger.anchor_batch(
        EDGES[i], state.next_batch_id, root, state.next_seq, len(entries), state.head,
        data or calldata,
    )  # fmt: skip


_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("grow"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("drop"), st.integers(0, 10_000), st.just(0)),
)


def _variant(name: str) -> bytes:
    """Well-formed calldata that is wrong for batch 0 of edge a in one specific way."""
    first8 = list(ENTRIES[0][:8])
    if name == "shorter":  # 7 of the 8 records the chain counts
        return _root_and_calldata(first8[:7], 0)[1]
    if name == "shifted":  # numbered from 1, the chain's batch from 0
        return _root_and_calldata(_renumbered(first8, 1), 1)[1]
    data = _root_and_calldata(first8, 0)[1]  # record 0's default task id spelled out
    tables = 34 + 2 + 20 * 4 + 2 + 32 + 2 + 64
    assert data[tables] == 1  # a chain start, its signature left out
    body_end = tables + 1 + 34 + 91
    task_id = first8[0].request.task_id
    return data[:tables] + b"\x03" + data[tables + 1 : body_end] + task_id + data[body_end:]


VARIANTS = {name: _variant(name) for name in ("shorter", "shifted", "explicit-id")}


def _mutate(
    data: bytes, mutations: list[tuple[str, int, int]], replacement: bytes | str | None
) -> bytes:
    if isinstance(replacement, bytes):
        return replacement
    out = bytearray(data if replacement is None else VARIANTS[replacement])
    for kind, at, value in mutations:
        at %= max(len(out), 1)
        if kind == "flip" and out:
            out[at] ^= value
        elif kind == "cut":
            del out[at:]
        elif kind == "grow":
            out[at:at] = bytes((value,))
        elif out:
            del out[at]
    return bytes(out)


@given(
    mutations=st.lists(_MUTATIONS, max_size=4),
    replacement=st.none() | st.binary(max_size=400) | st.sampled_from(sorted(VARIANTS)),
)
def test_hostile_calldata_is_a_finding_and_never_blocks_the_audit(
    mutations: list[tuple[str, int, int]], replacement: bytes | str | None
) -> None:
    async def run() -> None:
        ledger = MemoryLedger()
        for edge in EDGES:
            ledger.register_edge(edge, b"\x11" * 32)
        await _anchor(ledger, 0, list(ENTRIES[0][:8]))
        await _anchor(ledger, 0, list(ENTRIES[0][8:16]))
        await _anchor(ledger, 1, list(ENTRIES[1][:8]))
        calldata = ledger.edges[_edge(0)].calldata
        calldata[0] = _mutate(calldata[0], mutations, replacement)
        with AuditIndex(":memory:", DOMAIN) as index:
            added = await index.sync(ledger, [e.address for e in EDGES])
            bad = index.batch_findings()
            event(f"batch 0: {bad[0].code if bad else 'indexed'}")
            assert added == (16 if bad else 24)
            assert all(f.code in BATCH_CODES and f.batch_id == 0 for f in bad)
            for task in index.tasks(limit=100):
                if (task.edge, task.batch_id) == (_edge(0), 0):  # indexed: it rebuilt the root
                    with contextlib.suppress(SecureCIError):  # e.g. a flipped signature
                        await index.verify_task(task, ledger)
                else:
                    await index.verify_task(task, ledger)
                    assert all(f.code == FindingCode.REQUEST_CHAIN_GAP for f in task.findings)

    asyncio.run(run())


@given(
    devices=st.integers(1, 4),
    cuts=st.sets(st.integers(1, 23), max_size=6),
    dropped=st.none() | st.integers(0, 23),
    sync_every=st.integers(1, 8),
)
def test_gaps_are_exactly_the_missing_links(
    devices: int, cuts: set[int], dropped: int | None, sync_every: int
) -> None:
    """Any batching, any sync schedule: no finding on an intact chain; with one request never
    anchored, one gap finding on its successor in the device's chain (if it has one)."""
    entries = sample_tasks(24, edge_key=KEYS[0], domain=DOMAIN, devices=devices, seed=7)
    position = {e.request.struct_hash(): i for i, e in enumerate(entries)}
    kept = _renumbered([e for i, e in enumerate(entries) if i != dropped])
    bounds = sorted({0, len(kept), *(c for c in cuts if c < len(kept))})

    async def run() -> set[int]:
        ledger = MemoryLedger()
        ledger.register_edge(EDGES[0], b"\x11" * 32)
        flagged = set()
        with AuditIndex(":memory:", DOMAIN) as index:
            for k, (start, stop) in enumerate(itertools.pairwise(bounds)):
                await _anchor(ledger, 0, kept[start:stop])
                if k % sync_every == 0:
                    await index.sync(ledger, [EDGES[0].address])
            await index.sync(ledger, [EDGES[0].address])
            for task in index.tasks(limit=100):
                verified = await index.verify_task(task, None)
                assert verified.findings == task.findings
                assert all(f.code == FindingCode.REQUEST_CHAIN_GAP for f in task.findings)
                if task.findings:
                    flagged.add(position[task.record.request.struct_hash()])
        return flagged

    successor = None if dropped is None else dropped + devices
    assert asyncio.run(run()) == (set() if successor is None or successor >= 24 else {successor})


_ADDRESS = st.one_of(
    st.binary(min_size=20, max_size=20),
    st.binary(max_size=40),
    st.text(max_size=44),
    st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex()),
    st.integers(),
    st.none(),
)
_LOG_VALUE = st.one_of(st.integers(-5, 2**64), st.none(), st.text(max_size=5), st.booleans())


@given(
    name=st.sampled_from(["DeviceRegistered", "DeviceRevoked", "EdgeRegistered", "Other"]),
    key=_ADDRESS,
    quote=st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40), st.none()),
    block=_LOG_VALUE,
    index=_LOG_VALUE,
    args_kind=st.sampled_from(["ok", "missing", "not-a-mapping"]),
)
def test_registry_logs_parse_strictly(
    name: str, key: object, quote: object, block: object, index: object, args_kind: str
) -> None:
    key_arg = "edge" if name == "EdgeRegistered" else "device"
    args: object = {key_arg: key, "quoteId": quote, "partyId": 1}
    if args_kind == "missing":
        args = {"quoteId": quote}
    elif args_kind == "not-a-mapping":
        args = [key, quote]
    log = {"args": args, "blockNumber": block, "logIndex": index}
    try:
        event = registry_event(name, log)
    except ChainError:
        return
    assert name != "Other"
    assert args_kind == "ok"
    assert isinstance(block, int)
    assert not isinstance(block, bool)
    assert block >= 0
    assert (event.block, event.log_index) == (block, index)
    assert len(event.key) == 20
    assert event.key == (key if isinstance(key, bytes) else bytes.fromhex(str(key)[2:]))
    if name == "EdgeRegistered":
        assert (event.kind, event.value) == (EDGE, quote)
    else:
        assert (event.kind, event.value) == (DEVICE, b"\x01" if name == "DeviceRegistered" else b"")
