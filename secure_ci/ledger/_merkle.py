"""Positional Merkle trees over a batch, identical to the contract's ``BatchMerkle``.

The leaf of a record is ``keccak256(keccak256(abi.encode(uint64 seq, bytes32 recordHash)))``
(a hash of 32 bytes, never confused with a node, which hashes 64). A tree over ``n >= 1``
leaves: level 0 is the leaves in sequence order; level ``k + 1`` pairs the nodes ``(2j,
2j + 1)`` of level ``k`` as ``keccak256(left || right)`` in position order (not sorted); a
level of odd length promotes its last node unchanged; the root is the single node of the
last level (the leaf itself when ``n = 1``). A proof of the leaf at index ``i = seq -
firstSeq`` is the siblings that exist on the way up, bottom first: its length follows from
``(i, n)`` and each sibling's side from the bit of ``i`` at its level, so a proof proves one
position only (OpenZeppelin's sorted-pair proofs do not bind the position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from secure_ci.exceptions import ProofError
from secure_ci.ledger._records import keccak256

__all__ = [
    "MAX_PROOF_LENGTH",
    "MerkleTree",
    "chain_head",
    "leaf_hash",
    "proof_length",
    "records_hash",
    "root_from_proof",
    "verify_proof",
]

MAX_PROOF_LENGTH = 64


def leaf_hash(seq: int, record_hash: bytes) -> bytes:
    """The leaf of record ``record_hash`` at edge sequence number ``seq``."""
    if not 0 <= seq < 1 << 64 or len(record_hash) != 32:
        raise ProofError("leaf needs a uint64 sequence number and a 32-byte record hash")
    return keccak256(keccak256(seq.to_bytes(32, "big") + record_hash))


def _pair(left: bytes, right: bytes) -> bytes:
    return keccak256(left + right)


@dataclass(frozen=True, slots=True)
class MerkleTree:
    """All levels of a tree over ``leaves`` (level 0) up to the root."""

    levels: tuple[tuple[bytes, ...], ...]

    @classmethod
    def build(cls, leaves: Sequence[bytes]) -> MerkleTree:
        if not leaves:
            raise ProofError("a Merkle tree needs at least one leaf")
        level = tuple(leaves)
        levels = [level]
        while len(level) > 1:
            nxt = [_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = tuple(nxt)
            levels.append(level)
        return cls(tuple(levels))

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def __len__(self) -> int:
        return len(self.levels[0])

    def proof(self, index: int) -> list[bytes]:
        """The positional proof of leaf ``index``: existing siblings, bottom first."""
        if not 0 <= index < len(self):
            raise ProofError(f"leaf index {index} out of range")
        proof: list[bytes] = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                proof.append(level[sibling])
            index //= 2
        return proof


def proof_length(index: int, count: int) -> int:
    """How many siblings the proof of leaf ``index`` among ``count`` leaves has."""
    if not 0 <= index < count:
        raise ProofError(f"leaf index {index} out of range for {count} leaves")
    length = 0
    while count > 1:
        if index ^ 1 < count:
            length += 1
        index, count = index >> 1, (count + 1) >> 1
    return length


def root_from_proof(leaf: bytes, proof: Sequence[bytes], index: int, count: int) -> bytes:
    """The root that ``proof`` leads to from ``leaf`` at position ``index`` of ``count``.

    ProofError when the proof's length is not the one that position has (``BatchMerkle``'s
    ``rootFromProof``).
    """
    if len(proof) > MAX_PROOF_LENGTH or len(proof) != proof_length(index, count):
        raise ProofError("inclusion proof has the wrong length for the leaf's position")
    node, used = leaf, 0
    while count > 1:
        if index ^ 1 < count:
            sibling = proof[used]
            used += 1
            if not isinstance(sibling, bytes) or len(sibling) != 32:
                raise ProofError("proof elements must be 32 bytes")
            node = _pair(node, sibling) if index & 1 == 0 else _pair(sibling, node)
        index, count = index >> 1, (count + 1) >> 1
    return node


def verify_proof(root: bytes, leaf: bytes, proof: Sequence[bytes], index: int, count: int) -> None:
    """Raise ProofError unless ``proof`` shows ``leaf`` at ``index`` of ``count`` under ``root``."""
    if root_from_proof(leaf, proof, index, count) != root:
        raise ProofError("inclusion proof does not lead to the anchored root")


def records_hash(records: bytes) -> bytes:
    """A batch's commitment to its published records: ``keccak256(records)``."""
    return keccak256(records)


def chain_head(
    prev_head: bytes, root: bytes, records_digest: bytes, first_seq: int, count: int
) -> bytes:
    """The per-edge batch chain:
    ``keccak256(abi.encode(prevHead, root, recordsHash, firstSeq, count))``."""
    if len(prev_head) != 32 or len(root) != 32 or len(records_digest) != 32:
        raise ProofError("heads, roots and records hashes are 32 bytes")
    return keccak256(
        prev_head
        + root
        + records_digest
        + first_seq.to_bytes(32, "big")
        + count.to_bytes(32, "big")
    )
