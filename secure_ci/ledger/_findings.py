"""Audit findings: what is wrong with an anchored task or a whole batch, as data.

A finding does not stop an audit. Verification (:meth:`AuditIndex.verify_task`) still raises
when a record's cryptography does not hold (proof, signatures, measurement); findings are
everything else an auditor must see, each one machine-readable code and a human message:

task findings (``seq`` is the record's edge sequence number)
    ``replayed-request``       the device's task (device, task id) is anchored more than once
                               at the same edge: the same signed request twice, or another
                               request under the same task id (the device library sends a
                               task to one edge once; redundancy and fail-over send it to
                               *other* edges, each with its own signed request)
    ``device-not-registered``  the request's device key was not registered (never, or revoked)
                               at the end of the block that anchored the batch
    ``quote-id-mismatch``      the result's quote id is not the one the edge had registered at
                               the end of the anchoring block
    ``late-anchoring``         the anchoring block's timestamp is after the request's deadline
                               plus the grace (default 3600 s)
    ``request-chain-gap``      the request's ``prevRequest`` is non-zero and names a request
                               of the same device that no indexed batch holds
    ``challenge-equivocation`` a challenge on chain holds a result the edge's enclave signed
                               for this sequence number with another record hash
    ``refusal-equivocation``   the edge's enclave signed a refusal of this request in a
                               request-only challenge, yet anchored a record of it
    ``receipt-equivocation``   a device receipt (``--receipts``) holds a result the enclave
                               signed for this sequence number or this request with another
                               record hash
    ``receipt-omission``       a device receipt's task was never anchored though its window
                               passed (``seq`` is the receipt's; there is no anchored record,
                               ``batch_id`` is -1)

batch findings (``seq`` is -1; the batch's records are not indexed, the rest of the chain is)
    ``batch-not-direct-call``  the batch was not anchored by a direct ``anchorBatch`` call, so
                               its records cannot be read from the transaction's calldata
    ``batch-malformed``        the calldata does not decode
    ``batch-non-canonical``    the calldata decodes but is not the canonical encoding
    ``batch-wrong-edge``       the calldata names another edge
    ``batch-range-mismatch``   the calldata's first sequence number or count is not the chain's
    ``batch-root-mismatch``    the records do not rebuild the anchored Merkle root
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from secure_ci.exceptions import ProofError, RecordError
from secure_ci.ledger._calldata import BatchRecords, decode_batch, encode_batch
from secure_ci.ledger._merkle import MerkleTree, leaf_hash
from secure_ci.ledger._records import LedgerDomain

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "BadBatch",
    "Finding",
    "FindingCode",
    "check_batch",
    "late_anchoring",
]

DEFAULT_GRACE_SECONDS = 3600
"""Seconds after a request's deadline its batch may still be anchored without a finding."""


class FindingCode(StrEnum):
    """The machine-readable kind of a :class:`Finding` (see the module docstring)."""

    REPLAYED_REQUEST = "replayed-request"
    DEVICE_NOT_REGISTERED = "device-not-registered"
    QUOTE_ID_MISMATCH = "quote-id-mismatch"
    LATE_ANCHORING = "late-anchoring"
    REQUEST_CHAIN_GAP = "request-chain-gap"
    CHALLENGE_EQUIVOCATION = "challenge-equivocation"
    REFUSAL_EQUIVOCATION = "refusal-equivocation"
    RECEIPT_EQUIVOCATION = "receipt-equivocation"
    RECEIPT_OMISSION = "receipt-omission"
    BATCH_NOT_DIRECT_CALL = "batch-not-direct-call"
    BATCH_MALFORMED = "batch-malformed"
    BATCH_NON_CANONICAL = "batch-non-canonical"
    BATCH_WRONG_EDGE = "batch-wrong-edge"
    BATCH_RANGE_MISMATCH = "batch-range-mismatch"
    BATCH_ROOT_MISMATCH = "batch-root-mismatch"


@dataclass(frozen=True, slots=True)
class Finding:
    """One finding against an edge's task (``seq`` >= 0) or its whole batch (``seq`` = -1)."""

    code: FindingCode
    message: str
    edge: bytes
    batch_id: int
    seq: int = -1

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": str(self.code), "message": self.message}
        out.update(edge="0x" + self.edge.hex(), batch_id=self.batch_id)
        if self.seq >= 0:
            out["seq"] = self.seq
        return out


@dataclass(frozen=True, slots=True)
class BadBatch:
    """Why a batch's calldata cannot be indexed."""

    code: FindingCode
    message: str

    def error(self) -> RecordError | ProofError:
        """The exception :meth:`AuditIndex.add_batch` raises for it."""
        proof = (FindingCode.BATCH_ROOT_MISMATCH, FindingCode.BATCH_RANGE_MISMATCH)
        return (ProofError if self.code in proof else RecordError)(self.message)


def check_batch(
    domain: LedgerDomain,
    edge: bytes,
    calldata: bytes,
    root: bytes,
    first_seq: int | None,
    count: int | None,
) -> tuple[BatchRecords, MerkleTree] | BadBatch:
    """The batch and its tree when ``calldata`` is exactly what the chain anchored, else why not.

    ``root``, ``first_seq`` and ``count`` are as the chain holds them (None: not checked).
    """
    try:
        batch = decode_batch(calldata, verify_canonical=False)
    except RecordError as exc:
        return BadBatch(FindingCode.BATCH_MALFORMED, f"calldata does not decode: {exc}")
    except (ValueError, IndexError, OverflowError, struct.error) as exc:  # a decoder bug
        return BadBatch(FindingCode.BATCH_MALFORMED, f"calldata does not decode ({exc!r})")
    try:
        canonical = encode_batch(batch) == calldata
    except RecordError:
        canonical = False
    if not canonical:
        return BadBatch(FindingCode.BATCH_NON_CANONICAL, "calldata is not in canonical form")
    if batch.edge != edge:
        return BadBatch(FindingCode.BATCH_WRONG_EDGE, f"calldata names edge 0x{batch.edge.hex()}")
    if first_seq is not None and batch.first_seq != first_seq:
        return BadBatch(
            FindingCode.BATCH_RANGE_MISMATCH,
            f"calldata starts at seq {batch.first_seq}, the chain at {first_seq}",
        )
    if count is not None and len(batch.records) != count:
        return BadBatch(
            FindingCode.BATCH_RANGE_MISMATCH,
            f"calldata has {len(batch.records)} records, the chain {count}",
        )
    tree = MerkleTree.build(
        [leaf_hash(r.result.edge_seq, r.result.digest(domain)) for r in batch.records]
    )
    if tree.root != root:
        return BadBatch(
            FindingCode.BATCH_ROOT_MISMATCH,
            "the records in calldata do not rebuild the anchored Merkle root",
        )
    return batch, tree


def late_anchoring(deadline: int, anchored_at: int, grace: int) -> str | None:
    """The message of a late-anchoring finding, None if the record was anchored in time
    (or its anchoring time is unknown: ``anchored_at`` < 0)."""
    if anchored_at < 0 or anchored_at <= deadline + grace:
        return None
    return (
        f"anchored at {anchored_at} (block time), {anchored_at - deadline} s after the"
        f" request's deadline {deadline} (grace {grace} s)"
    )
