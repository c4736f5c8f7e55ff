"""Device side: find its tasks on the ledger, keep receipts, challenge omissions.

A receipt is everything a device needs to prove, to anyone with a node, that its task is on
the ledger: the record (request, result, both signatures), the batch id, the inclusion proof,
the anchored root, and the chain id + contract address that fix the EIP-712 domain. The proof
is rebuilt from the batch's calldata (the device trusts no one to hand it a proof) and checked
locally and against the on-chain root. A task still missing after its deadline plus a grace
period is forced onto the chain with a challenge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from secure_ci._encoding import canonical_cbor, decode_cbor
from secure_ci.exceptions import (
    ContractRevertError,
    ProofError,
    RecordError,
    SecureCIError,
    SignatureError,
)
from secure_ci.ledger._calldata import (
    BatchRecords,
    chain_links,
    chain_successors,
    covering_signature,
    decode_batch,
)
from secure_ci.ledger._merkle import MerkleTree, leaf_hash, verify_proof
from secure_ci.ledger._records import LedgerDomain, TaskRequest, TaskResult

__all__ = ["Receipt", "ReceiptBook", "ReceiptLedger", "find_receipt"]

log = logging.getLogger(__name__)

MAX_RECEIPT_BYTES = 8192


class ReceiptLedger(Protocol):
    """The part of ``LedgerClient`` the device side needs."""

    async def edge_state(self, addr: Any) -> Any: ...
    async def batch(self, addr: Any, batch_id: int) -> Any: ...
    async def batch_calldata(self, addr: Any, batch_id: int) -> bytes: ...
    async def verify_task(
        self, addr: Any, batch_id: int, seq: int, record_hash: bytes, proof: list[bytes]
    ) -> bool: ...
    async def challenge_once(
        self, device_acct: Any, result: TaskResult, edge_sig: bytes
    ) -> int: ...


BatchCache: TypeAlias = dict[tuple[bytes, int], tuple[Any, MerkleTree, BatchRecords, list[int]]]
"""Decoded batches by (edge, batch id): chain info, Merkle tree, records, chain successors."""


def _hex(addr: bytes) -> str:
    return "0x" + addr.hex()


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that a task is anchored: record, batch, positional inclusion proof, root, the
    batch's first sequence number and count (which fix the leaf's position), and domain."""

    request: TaskRequest
    result: TaskResult
    device_sig: bytes
    edge_sig: bytes
    batch_id: int
    proof: tuple[bytes, ...]
    root: bytes
    domain: LedgerDomain
    first_seq: int
    count: int

    def verify(self) -> None:
        """Check signatures and the proof against ``root`` (raises on any failure)."""
        if not self.result.matches(self.request):
            raise RecordError("result does not answer the request")
        if self.request.recover(self.device_sig, self.domain) != self.request.device:
            raise SignatureError("device signature does not match the request's device")
        if self.result.recover(self.edge_sig, self.domain) != self.request.edge:
            raise SignatureError("enclave signature does not match the request's edge")
        leaf = leaf_hash(self.result.edge_seq, self.result.digest(self.domain))
        index = self.result.edge_seq - self.first_seq
        if not 0 <= index < self.count:
            raise ProofError("the receipt's batch does not cover the task's sequence number")
        verify_proof(self.root, leaf, self.proof, index, self.count)

    def encode(self) -> bytes:
        """Canonical CBOR, for the device to store."""
        return canonical_cbor(
            [
                2,
                [getattr(self.request, f) for f in TaskRequest.__slots__],
                [getattr(self.result, f) for f in TaskResult.__slots__],
                self.device_sig,
                self.edge_sig,
                self.batch_id,
                list(self.proof),
                self.root,
                self.domain.chain_id,
                self.domain.contract,
                self.first_seq,
                self.count,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        """Parse a stored receipt strictly (RecordError on anything malformed)."""
        try:
            value = decode_cbor(data, max_bytes=MAX_RECEIPT_BYTES)
            version, req, res, dsig, esig, batch_id, proof, root, chain_id, contract = value[:10]
            if version != 2 or len(value) != 12 or not all(isinstance(p, bytes) for p in proof):
                raise RecordError("unsupported receipt (version 2 has positional proofs)")
            first_seq, count = value[10:]
            if not (isinstance(first_seq, int) and isinstance(count, int)):
                raise RecordError("bad receipt batch range")
            if not (0 <= first_seq < 1 << 64 and 0 < count < 1 << 32):
                raise RecordError("bad receipt batch range")
            if len(proof) > 64 or not isinstance(batch_id, int) or not 0 <= batch_id < 1 << 64:
                raise RecordError("bad receipt batch id or proof")
            if not (isinstance(dsig, bytes) and isinstance(esig, bytes) and len(root) == 32):
                raise RecordError("bad receipt signatures or root")
            return cls(
                TaskRequest(*req),
                TaskResult(*res),
                dsig,
                esig,
                batch_id,
                tuple(proof),
                root,
                LedgerDomain(chain_id, contract),
                first_seq,
                count,
            )
        except RecordError:
            raise
        except (SecureCIError, TypeError, ValueError) as exc:
            raise RecordError(f"malformed receipt: {exc}") from exc


async def _find_batch(ledger: ReceiptLedger, edge: str, seq: int, n_batches: int) -> int:
    lo, hi = 0, n_batches - 1
    for _ in range(64):
        if lo > hi:
            break
        mid = (lo + hi) // 2
        info = await ledger.batch(edge, mid)
        if seq < info.first_seq:
            hi = mid - 1
        elif seq >= info.first_seq + info.count:
            lo = mid + 1
        else:
            return mid
    raise ProofError(f"no anchored batch holds sequence number {seq}")


async def find_receipt(
    ledger: ReceiptLedger,
    domain: LedgerDomain,
    request: TaskRequest,
    result: TaskResult,
    device_sig: bytes,
    edge_sig: bytes,
    *,
    trees: BatchCache | None = None,
) -> Receipt | None:
    """The receipt of an anchored task, or None if the edge has not anchored it yet.

    Raises ProofError if the edge anchored a *different* record at the task's sequence number.
    ``trees`` caches decoded batches across calls (one calldata read per batch, not per task).
    """
    edge = _hex(request.edge)
    state = await ledger.edge_state(edge)
    if result.edge_seq >= int(state.next_seq):
        return None
    batch_id = await _find_batch(ledger, edge, result.edge_seq, int(state.next_batch_id))
    cached = trees.get((request.edge, batch_id)) if trees is not None else None
    if cached is None:
        info = await ledger.batch(edge, batch_id)
        batch = decode_batch(await ledger.batch_calldata(edge, batch_id))
        leaves = [leaf_hash(r.result.edge_seq, r.result.digest(domain)) for r in batch.records]
        successors = chain_successors(chain_links(batch.records))
        cached = (info, MerkleTree.build(leaves), batch, successors)
        if trees is not None:
            trees[(request.edge, batch_id)] = cached
    info, tree, batch, successors = cached
    index = result.edge_seq - batch.first_seq
    if not 0 <= index < len(batch.records):
        raise ProofError("batch calldata does not cover the task's sequence number")
    published = batch.records[index]
    # the published device signature may be left out (a later request of the chain covers it)
    if (published.request, published.result) != (request, result):
        raise ProofError("the edge anchored a different record at this task's sequence number")
    # what auditors will check: the published (or chain-covering) device signature
    try:
        signed, signature = covering_signature(batch.records, successors, index)
        if signed.recover(signature, domain) != request.device:
            raise SignatureError("it recovers to another address")
    except (RecordError, SignatureError) as exc:
        raise ProofError(f"the device signature the edge published does not verify: {exc}") from exc
    proof = tuple(tree.proof(index))
    receipt = Receipt(
        request, result, device_sig, edge_sig, batch_id, proof, bytes(info.root), domain,
        int(info.first_seq), int(info.count),
    )  # fmt: skip
    receipt.verify()
    if not await ledger.verify_task(
        edge, batch_id, result.edge_seq, result.digest(domain), list(proof)
    ):
        raise ProofError("the contract rejects the inclusion proof")
    return receipt


@dataclass
class _Pending:
    request: TaskRequest
    result: TaskResult
    device_sig: bytes
    edge_sig: bytes
    challenge_id: int | None = None


@dataclass
class ReceiptBook:
    """A device's tasks: pending ones, receipts of anchored ones, challenges of missing ones.

    ``grace_seconds`` after a request's deadline the edge must have anchored the task;
    :meth:`check` (given ``now`` in unix seconds) collects receipts and challenges the rest.
    """

    ledger: ReceiptLedger
    domain: LedgerDomain
    device_account: Any
    grace_seconds: int = 60
    receipts: dict[bytes, Receipt] = field(default_factory=dict)
    pending: dict[bytes, _Pending] = field(default_factory=dict)

    def track(
        self, request: TaskRequest, result: TaskResult, device_sig: bytes, edge_sig: bytes
    ) -> None:
        """Start tracking a completed task (signatures are checked first)."""
        if not result.matches(request):
            raise RecordError("result does not answer the request")
        if result.recover(edge_sig, self.domain) != request.edge:
            raise SignatureError("result is not signed by the request's edge")
        if request.recover(device_sig, self.domain) != request.device:
            raise SignatureError("request is not signed by its device")
        self.pending[request.task_id] = _Pending(request, result, device_sig, edge_sig)

    async def check(self, now: int) -> list[int]:
        """Collect receipts of anchored tasks; challenge overdue ones; return new challenge ids.

        A task the edge anchored wrongly (another record at its sequence number, calldata that
        does not decode or does not match the root) is challenged at once: what the edge
        published is under its control, so it must never stop the device from challenging.
        """
        challenged = []
        trees: BatchCache = {}
        for task_id, p in list(self.pending.items()):
            try:
                receipt = await find_receipt(
                    self.ledger,
                    self.domain,
                    p.request,
                    p.result,
                    p.device_sig,
                    p.edge_sig,
                    trees=trees,
                )
            except (RecordError, ProofError) as exc:
                log.warning("task 0x%s is anchored wrongly: %s", task_id.hex(), exc)
                receipt, overdue = None, True
            else:
                overdue = now > p.request.deadline + self.grace_seconds
            if receipt is not None:
                self.receipts[task_id] = receipt
                del self.pending[task_id]
            elif p.challenge_id is None and overdue:
                try:
                    p.challenge_id = await self.ledger.challenge_once(
                        self.device_account, p.result, p.edge_sig
                    )
                except ContractRevertError as exc:  # refused for this task: check the rest
                    log.warning("task 0x%s not challenged: %s", task_id.hex(), exc)
                    continue
                challenged.append(p.challenge_id)
        return challenged
