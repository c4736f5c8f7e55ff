"""The hot anchoring transaction, built without web3's contract machinery.

An edge sends one ``anchorBatch`` per batch (hundreds of kilobytes of calldata), so the
generic path (ABI lookup, ``eth_estimateGas``, which runs the transaction once or twice more
on the node, then request/receipt formatters over the whole payload) costs more than
signing the batch's records. Here the call data is the precomputed selector plus one
``eth_abi`` encoding, and the gas limit is computed from the calldata: ``anchorBatch`` never
loops over records, so its execution gas is flat and the rest is the intrinsic cost of the
bytes, bounded by EIP-7623's floor (Prague: 10 gas per token, a non-zero byte is 4 tokens).
Unused gas is not charged, so the bound costs nothing; a revert is reported with the
contract's custom error by replaying the call (see ``LedgerClient.anchor_batch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eth_abi.abi import encode as abi_encode

from secure_ci.exceptions import ChainError
from secure_ci.ledger._records import keccak256

__all__ = [
    "ANCHOR_EXECUTION_GAS",
    "ANCHOR_FUNCTION",
    "anchor_call_data",
    "anchor_gas_limit",
    "anchored_head",
    "calldata_tokens",
]

ANCHOR_FUNCTION = "anchorBatch(uint64,bytes32,uint64,uint32,bytes32,bytes)"
_SELECTOR = keccak256(ANCHOR_FUNCTION.encode())[:4]
_TYPES = ("uint64", "bytes32", "uint64", "uint32", "bytes32", "bytes")
_ANCHORED_TOPIC = keccak256(b"BatchAnchored(address,uint64,bytes32,uint64,uint32,bytes32)")
_TX_BASE_GAS = 21_000
_FLOOR_PER_TOKEN = 10  # EIP-7623 (Prague); before it a token cost 4 and there was no floor
ANCHOR_EXECUTION_GAS = 250_000
"""Bound on anchorBatch's execution gas (measured ~120k: a few cold SSTOREs, one event,
and keccak256 of the records, ~25k for a 2,000-record batch); the contract does not parse
the records."""


def anchor_call_data(
    batch_id: int, root: bytes, first_seq: int, count: int, prev_head: bytes, records: bytes
) -> bytes:
    """The transaction data of ``anchorBatch(...)`` (arguments already validated)."""
    return _SELECTOR + abi_encode(_TYPES, (batch_id, root, first_seq, count, prev_head, records))


def calldata_tokens(data: bytes) -> int:
    """EIP-7623 calldata tokens: one per zero byte, four per non-zero byte."""
    zeros = data.count(0)
    return zeros + 4 * (len(data) - zeros)


def anchor_gas_limit(data: bytes) -> int:
    """A gas limit that covers an anchoring transaction with ``data`` under Cancun and Prague
    pricing: base + max(4 * tokens + execution, 10 * tokens) <= base + 10 * tokens + bound."""
    return _TX_BASE_GAS + _FLOOR_PER_TOKEN * calldata_tokens(data) + ANCHOR_EXECUTION_GAS


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    raise ChainError(f"unexpected log field {value!r}")


def anchored_head(receipt: Mapping[str, Any], contract: str) -> bytes:
    """``newHead`` of the ``BatchAnchored`` log the contract emitted in ``receipt``."""
    for log in receipt.get("logs", ()):
        topics = log.get("topics", ())
        if str(log.get("address", "")).lower() != contract.lower() or not topics:
            continue
        if _bytes(topics[0]) == _ANCHORED_TOPIC:
            data = _bytes(log.get("data", b""))
            if len(data) != 128:
                raise ChainError("malformed BatchAnchored log")
            return data[96:128]
    raise ChainError("transaction mined without a BatchAnchored event")
