"""Values the ledger client returns, and validation of what it sends to the contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address

from secure_ci.exceptions import RecordError

__all__ = [
    "AnchorReceipt",
    "BatchAnchoredEvent",
    "BatchInfo",
    "ChallengeInfo",
    "DisputeInfo",
    "EdgeInfo",
    "EdgeState",
    "as_address",
    "as_bytes32",
    "as_opening",
    "as_proof",
    "as_task_request",
    "as_task_result",
]

TASK_RESULT_FIELDS = (
    ("task_id", "taskId"),
    ("request_hash", "requestHash"),
    ("output_commitment", "outputCommitment"),
    ("measurement", "measurement"),
    ("quote_id", "quoteId"),
    ("status", "status"),
    ("latency_ms", "latencyMs"),
    ("edge_seq", "edgeSeq"),
)
_UINT_BITS = {"status": 8, "latency_ms": 32, "edge_seq": 64}
MAX_PROOF_LENGTH = 64  # a tree deeper than 2**64 leaves cannot exist


@dataclass(frozen=True)
class AnchorReceipt:
    """The mined anchoring transaction and the batch-chain head the contract computed."""

    tx_hash: bytes
    block_number: int
    gas_used: int
    new_head: bytes


@dataclass(frozen=True)
class EdgeState:
    """An edge's batch chain on the ledger (all zero for an unknown edge)."""

    next_batch_id: int
    next_seq: int
    head: bytes
    omissions: int
    registered: bool
    measurement: bytes
    active: bool = False


@dataclass(frozen=True)
class EdgeInfo:
    """An edge's registration: owning party, quote id and service endpoint."""

    party_id: int
    quote_id: bytes
    endpoint: str


@dataclass(frozen=True)
class BatchInfo:
    """What the contract stores per anchored batch.

    ``measurement`` is the edge's registered measurement when the batch was anchored (the
    contract anchors only while it is on the allow-list).
    """

    root: bytes
    first_seq: int
    count: int
    block_number: int
    measurement: bytes


@dataclass(frozen=True)
class BatchAnchoredEvent:
    """One ``BatchAnchored`` log, with where it was mined."""

    edge: str
    batch_id: int
    root: bytes
    first_seq: int
    count: int
    new_head: bytes
    block_number: int
    tx_hash: bytes


@dataclass(frozen=True)
class ChallengeInfo:
    """A forced-inclusion challenge; ``state`` is 1 open, 2 resolved, 3 omission recorded."""

    device: str
    edge: str
    seq: int
    state: int
    deadline: int
    record_hash: bytes


@dataclass(frozen=True)
class DisputeInfo:
    """A recorded k-way dispute: ``edges`` results of one task (same device and input)
    whose opened canonical digests differ; ``majority`` is the strict majority's canonical
    digest (zero without one) and ``dissenters`` how many edges differ from it (each
    has a ``DissentRecorded`` event)."""

    task_id: bytes
    input_key: bytes  # keccak256(abi.encode(device, inputCommitment))
    majority: bytes
    reporter: str
    edges: int
    dissenters: int


def as_opening(opening: object) -> tuple[bytes, bytes, bytes]:
    """The ABI tuple of an output commitment's opening (``OutputOpening`` or a 3-tuple)."""
    if isinstance(opening, tuple | list) and len(opening) == 3:
        salt, canonical, payload = opening
    else:
        try:
            salt, canonical, payload = opening.salt, opening.canonical, opening.payload  # type: ignore[attr-defined]
        except AttributeError as exc:
            raise RecordError(f"opening: missing field ({exc})") from exc
    return (
        as_bytes32(salt, "opening salt"),
        as_bytes32(canonical, "opening canonical"),
        as_bytes32(payload, "opening payload"),
    )


def as_address(value: object, name: str = "address") -> ChecksumAddress:
    """A checksummed address from hex text, 20 raw bytes or anything with ``.address``."""
    value = getattr(value, "address", value)
    if isinstance(value, bytes | bytearray):
        if len(value) != 20:
            raise RecordError(f"{name}: {len(value)} bytes, expected 20")
        value = "0x" + bytes(value).hex()
    if not isinstance(value, str):
        raise RecordError(f"{name}: not an address")
    try:
        return to_checksum_address(value)
    except ValueError as exc:
        raise RecordError(f"{name}: {value!r} is not an address") from exc


def as_bytes32(value: object, name: str) -> bytes:
    """Exactly 32 bytes (hashes, roots, commitments, measurements)."""
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise RecordError(f"{name}: expected 32 bytes")
    return bytes(value)


def as_uint(value: object, name: str, bits: int) -> int:
    """An integer that fits the Solidity ``uint<bits>`` it is sent as."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise RecordError(f"{name}: expected uint{bits}")
    return value


def as_proof(proof: Sequence[bytes]) -> list[bytes]:
    """A Merkle proof: at most 64 sibling hashes of 32 bytes."""
    if len(proof) > MAX_PROOF_LENGTH:
        raise RecordError(f"proof: {len(proof)} nodes exceeds {MAX_PROOF_LENGTH}")
    return [as_bytes32(node, "proof node") for node in proof]


def as_task_result(result: object) -> tuple[Any, ...]:
    """The ABI tuple of a TaskResult given as a dataclass, a mapping or a tuple."""
    if isinstance(result, Mapping):
        try:
            values = [result[s] if s in result else result[c] for s, c in TASK_RESULT_FIELDS]
        except KeyError as exc:
            raise RecordError(f"task result: missing field {exc}") from exc
    elif isinstance(result, tuple | list):
        values = list(result)
    elif all(hasattr(result, s) for s, _ in TASK_RESULT_FIELDS):
        values = [getattr(result, s) for s, _ in TASK_RESULT_FIELDS]
    else:
        raise RecordError("task result: not a TaskResult, mapping or tuple")
    if len(values) != len(TASK_RESULT_FIELDS):
        raise RecordError(f"task result: {len(values)} fields, expected {len(TASK_RESULT_FIELDS)}")
    checked: list[Any] = []
    for (name, _), value in zip(TASK_RESULT_FIELDS, values, strict=True):
        bits = _UINT_BITS.get(name)
        checked.append(as_bytes32(value, name) if bits is None else as_uint(value, name, bits))
    return tuple(checked)


def as_task_request(request: Any) -> tuple[Any, ...]:
    """The ABI tuple of a TaskRequest dataclass (``secure_ci.ledger.TaskRequest``)."""
    try:
        return (
            as_bytes32(request.task_id, "task_id"),
            as_address(request.device, "device"),
            as_uint(request.device_seq, "device_seq", 64),
            as_bytes32(request.model_id, "model_id"),
            as_uint(request.cut, "cut", 16),
            as_bytes32(request.input_commitment, "input_commitment"),
            as_address(request.edge, "edge"),
            as_uint(request.deadline, "deadline", 64),
            as_bytes32(request.prev_request, "prev_request"),
        )
    except AttributeError as exc:
        raise RecordError(f"task request: missing field ({exc})") from exc
