"""Merkle batches compatible with OpenZeppelin's ``MerkleProof.verify``.

Pairs are hashed in sorted order (commutative keccak), so a leaf carries its position: the
leaf is OpenZeppelin's double hash ``keccak256(keccak256(abi.encode(uint64 seq, bytes32
recordHash)))``. Leaves stay in sequence order; an unpaired last node is promoted unchanged.
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
    "root_from_proof",
    "verify_proof",
]

MAX_PROOF_LENGTH = 64


def leaf_hash(seq: int, record_hash: bytes) -> bytes:
    """The leaf of record ``record_hash`` at edge sequence number ``seq``."""
    if not 0 <= seq < 1 << 64 or len(record_hash) != 32:
        raise ProofError("leaf needs a uint64 sequence number and a 32-byte record hash")
    return keccak256(keccak256(seq.to_bytes(32, "big") + record_hash))


def _pair(a: bytes, b: bytes) -> bytes:
    return keccak256(a + b if a < b else b + a)


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
        """Sibling hashes from leaf ``index`` up to the root (OpenZeppelin order)."""
        if not 0 <= index < len(self):
            raise ProofError(f"leaf index {index} out of range")
        proof: list[bytes] = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                proof.append(level[sibling])
            index //= 2
        return proof


def root_from_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` leads to from ``leaf`` (OpenZeppelin ``processProof``)."""
    if len(proof) > MAX_PROOF_LENGTH:
        raise ProofError("inclusion proof is too long")
    node = leaf
    for sibling in proof:
        if not isinstance(sibling, bytes) or len(sibling) != 32:
            raise ProofError("proof elements must be 32 bytes")
        node = _pair(node, sibling)
    return node


def verify_proof(root: bytes, leaf: bytes, proof: Sequence[bytes]) -> None:
    """Raise ProofError unless ``proof`` shows ``leaf`` is under ``root``."""
    if root_from_proof(leaf, proof) != root:
        raise ProofError("inclusion proof does not lead to the anchored root")


def chain_head(prev_head: bytes, root: bytes, first_seq: int, count: int) -> bytes:
    """The per-edge batch chain: ``keccak256(abi.encode(prevHead, root, firstSeq, count))``."""
    if len(prev_head) != 32 or len(root) != 32:
        raise ProofError("heads and roots are 32 bytes")
    return keccak256(prev_head + root + first_seq.to_bytes(32, "big") + count.to_bytes(32, "big"))
