"""An in-memory model of the SecureCILedger contract, to test ledger users in isolation.

It enforces the same anchoring rules as the contract (registered edge with an allowed
measurement, next batch id, first sequence, previous head, non-empty) and raises
ContractRevertError with the contract's error names. It is no substitute for the real chain:
tests of the real path use ``open_ledger("inprocess")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from secure_ci.exceptions import ContractRevertError, ProofError
from secure_ci.ledger._chain import BatchInfo
from secure_ci.ledger._journal import JournalEntry, sign_entry
from secure_ci.ledger._merkle import chain_head, leaf_hash, records_hash, root_from_proof
from secure_ci.ledger._records import (
    LedgerDomain,
    Signer,
    TaskRequest,
    TaskResult,
    keccak256,
    recover_signer,
    task_id_for,
)

__all__ = ["MemoryLedger", "sample_requests", "sample_tasks"]


def _addr(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return bytes.fromhex(str(getattr(value, "address", value)).removeprefix("0x"))


@dataclass(frozen=True)
class _EdgeState:
    next_batch_id: int
    next_seq: int
    head: bytes
    omissions: int
    registered: bool
    measurement: bytes
    active: bool


@dataclass(frozen=True)
class _Receipt:
    tx_hash: bytes
    block_number: int
    gas_used: int
    new_head: bytes


@dataclass
class _Edge:
    measurement: bytes
    batches: list[BatchInfo] = field(default_factory=list)
    calldata: list[bytes] = field(default_factory=list)
    head: bytes = bytes(32)
    next_seq: int = 0
    omissions: int = 0


class MemoryLedger:
    """Contract semantics in memory; ``now`` drives challenge windows."""

    def __init__(self, *, chain_id: int = 31337, window: int = 3600) -> None:
        self.chain_id = chain_id
        self.address = "0x" + "5c" * 20
        self.window = window
        self.now = 0
        self.block = 0
        self.edges: dict[bytes, _Edge] = {}
        self.devices: set[bytes] = set()
        self.allowed: set[bytes] = set()
        self.challenges: dict[int, tuple[bytes, TaskResult, int, bool]] = {}

    @property
    def domain(self) -> LedgerDomain:
        return LedgerDomain(self.chain_id, _addr(self.address))

    def register_edge(self, edge: Any, measurement: bytes) -> None:
        self.edges[_addr(edge)] = _Edge(measurement)
        self.allowed.add(measurement)

    def register_device(self, device: Any) -> None:
        self.devices.add(_addr(device))

    def wipe(self) -> None:
        """Lose every batch (a dev chain restarted); registrations stay."""
        for edge in self.edges:
            self.edges[edge] = _Edge(self.edges[edge].measurement)

    def rollback(self, keep: int) -> None:
        """Lose every batch from ``keep`` on (a dev chain restarted from an older snapshot)."""
        for edge, e in self.edges.items():
            kept = _Edge(e.measurement, e.batches[:keep], e.calldata[:keep], omissions=e.omissions)
            for info, records in zip(kept.batches, kept.calldata, strict=True):
                kept.head = chain_head(
                    kept.head, info.root, records_hash(records), info.first_seq, info.count
                )
                kept.next_seq = info.first_seq + info.count
            self.edges[edge] = kept

    async def edge_state(self, addr: Any) -> _EdgeState:
        e = self.edges.get(_addr(addr))
        if e is None:
            return _EdgeState(0, 0, bytes(32), 0, False, bytes(32), False)
        return _EdgeState(
            len(e.batches), e.next_seq, e.head, e.omissions, True, e.measurement, True
        )

    async def anchor_batch(
        self,
        edge_acct: Any,
        batch_id: int,
        root: bytes,
        first_seq: int,
        count: int,
        prev_head: bytes,
        records: bytes,
    ) -> _Receipt:
        e = self.edges.get(_addr(edge_acct))
        if e is None:
            raise ContractRevertError("UnknownEdge")
        if e.measurement not in self.allowed:
            raise ContractRevertError("MeasurementNotAllowed")
        if count == 0:
            raise ContractRevertError("EmptyBatch")
        if count > 2048:
            raise ContractRevertError("BatchTooLarge")
        if batch_id != len(e.batches):
            raise ContractRevertError("BatchGap" if batch_id > len(e.batches) else "BatchReplay")
        if first_seq != e.next_seq:
            raise ContractRevertError("FirstSeqMismatch")
        if prev_head != e.head:
            raise ContractRevertError("PrevHeadMismatch")
        self.block += 1
        e.head = chain_head(prev_head, root, records_hash(records), first_seq, count)
        e.batches.append(BatchInfo(root, first_seq, count, self.block, e.measurement))
        e.calldata.append(records)
        e.next_seq += count
        return _Receipt(
            self.block.to_bytes(32, "big"), self.block, 21_000 + 16 * len(records), e.head
        )

    async def batch(self, addr: Any, batch_id: int) -> BatchInfo:
        e = self.edges.get(_addr(addr))
        if e is None or batch_id >= len(e.batches):
            raise ContractRevertError("UnknownBatch")
        return e.batches[batch_id]

    async def batch_calldata(self, addr: Any, batch_id: int) -> bytes:
        await self.batch(addr, batch_id)
        return self.edges[_addr(addr)].calldata[batch_id]

    async def verify_task(
        self, addr: Any, batch_id: int, seq: int, record_hash: bytes, proof: Sequence[bytes]
    ) -> bool:
        b = await self.batch(addr, batch_id)
        if not b.first_seq <= seq < b.first_seq + b.count:
            return False
        try:
            leaf = leaf_hash(seq, record_hash)
            return root_from_proof(leaf, proof, seq - b.first_seq, b.count) == b.root
        except ProofError:
            return False

    async def is_allowed_measurement(self, m: bytes) -> bool:
        return m in self.allowed

    async def is_registered_device(self, addr: Any) -> bool:
        return _addr(addr) in self.devices

    async def challenge(self, device_acct: Any, result: TaskResult, edge_sig: bytes) -> int:
        if _addr(device_acct) not in self.devices:
            raise ContractRevertError("NotRegisteredDevice")
        edge = recover_signer(edge_sig, result.digest(self.domain))
        if edge not in self.edges:
            raise ContractRevertError("InvalidEdgeSignature")
        digest = result.digest(self.domain)
        if any(r.digest(self.domain) == digest for _, r, _, _ in self.challenges.values()):
            raise ContractRevertError("ChallengeExists")
        cid = len(self.challenges)
        self.challenges[cid] = (edge, result, self.now + self.window, False)
        return cid

    async def challenge_once(self, device_acct: Any, result: TaskResult, edge_sig: bytes) -> int:
        digest = result.digest(self.domain)
        for cid, (_, challenged, _, _) in self.challenges.items():
            if challenged.digest(self.domain) == digest:
                return cid
        return await self.challenge(device_acct, result, edge_sig)

    async def respond_challenge(
        self, edge_acct: Any, challenge_id: int, batch_id: int, proof: Sequence[bytes]
    ) -> None:
        edge, result, deadline, done = self.challenges[challenge_id]
        if done:
            raise ContractRevertError("ChallengeNotOpen")
        ok = await self.verify_task(
            edge, batch_id, result.edge_seq, result.digest(self.domain), proof
        )
        if not ok:
            raise ContractRevertError("InvalidProof")
        self.challenges[challenge_id] = (edge, result, deadline, True)

    async def finalize_challenge(self, caller: Any, challenge_id: int) -> None:
        edge, result, deadline, done = self.challenges[challenge_id]
        if done:
            raise ContractRevertError("ChallengeNotOpen")
        if self.now <= deadline:
            raise ContractRevertError("ChallengeWindowOpen")
        self.edges[edge].omissions += 1
        self.challenges[challenge_id] = (edge, result, deadline, True)


def sample_requests(
    n: int,
    *,
    edge: bytes,
    domain: LedgerDomain,
    first_seq: int = 0,
    devices: int = 4,
    seed: int = 0,
    chained: bool = True,
) -> list[tuple[TaskRequest, bytes]]:
    """``n`` deterministic signed requests to ``edge`` from ``devices`` round-robin devices.

    Like the device library's: default task ids, and with ``chained`` each device's requests
    form one chain (``prevRequest``); without it every request starts a chain.
    """
    keys = [
        Signer(keccak256(b"device-key" + seed.to_bytes(8, "big") + i.to_bytes(4, "big")))
        for i in range(devices)
    ]
    prev = [bytes(32)] * devices
    out = []
    for i in range(n):
        seq, d = first_seq + i, i % devices
        input_c = keccak256(b"in" + seed.to_bytes(8, "big") + seq.to_bytes(8, "big"))
        device = keys[d].address
        request = TaskRequest(
            task_id_for(device, input_c), device, seq // devices, keccak256(b"model"), 3,
            input_c, edge, 1_700_000_000 + seq, prev[d],
        )  # fmt: skip
        if chained:
            prev[d] = request.struct_hash()
        out.append((request, request.sign(keys[d], domain)))
    return out


def sample_tasks(
    n: int,
    *,
    edge_key: bytes,
    domain: LedgerDomain,
    first_seq: int = 0,
    devices: int = 4,
    seed: int = 0,
    measurement: bytes = b"\x11" * 32,
    quote_id: bytes = b"\x22" * 32,
    chained: bool = True,
) -> list[JournalEntry]:
    """``n`` deterministic, correctly signed task records of the edge with key ``edge_key``."""
    edge_signer = Signer(edge_key)
    requests = sample_requests(
        n, edge=edge_signer.address, domain=domain, first_seq=first_seq, devices=devices,
        seed=seed, chained=chained,
    )  # fmt: skip
    entries = []
    for i, (request, device_sig) in enumerate(requests):
        seq = first_seq + i
        tag = seed.to_bytes(8, "big") + seq.to_bytes(8, "big")
        result = TaskResult(
            request.task_id, request.struct_hash(), keccak256(b"out" + tag),
            measurement, quote_id, 0, 5 + i % 50, seq,
        )  # fmt: skip
        entries.append(sign_entry(request, device_sig, result, edge_signer, domain))
    return entries
