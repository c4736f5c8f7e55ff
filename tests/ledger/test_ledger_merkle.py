"""Positional Merkle trees (the contract's BatchMerkle) over double-hashed, sequenced leaves."""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_utils import keccak
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import ProofError
from secure_ci.ledger._merkle import (
    MerkleTree,
    chain_head,
    leaf_hash,
    proof_length,
    records_hash,
    root_from_proof,
    verify_proof,
)


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i, keccak(i.to_bytes(4, "big"))) for i in range(n)]


def test_leaf_and_head_match_abi_encode() -> None:
    record = keccak(b"r")
    assert leaf_hash(5, record) == keccak(keccak(encode(["uint64", "bytes32"], [5, record])))
    assert records_hash(b"calldata") == keccak(b"calldata")
    head = chain_head(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 10, 3)
    expected = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint64", "uint32"],
            [b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 10, 3],
        )
    )
    assert head == expected


def _reference_root(leaves: list[bytes]) -> bytes:
    # the tree as documented, written independently of _merkle: pair in position order,
    # promote the last node of an odd level
    level = list(leaves)
    while len(level) > 1:
        nxt = [keccak(level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = nxt + ([level[-1]] if len(level) % 2 else [])
    return level[0]


def test_small_trees_are_as_documented() -> None:
    a, b, c = _leaves(3)
    assert MerkleTree.build([a]).root == a
    assert MerkleTree.build([a, b]).root == keccak(a + b)
    assert MerkleTree.build([a, b, c]).root == keccak(keccak(a + b) + c)
    assert MerkleTree.build([b, a]).root != MerkleTree.build([a, b]).root  # not sorted pairs
    assert MerkleTree.build([a, b, c]).proof(2) == [keccak(a + b)]
    assert [proof_length(2, 3), proof_length(0, 1), proof_length(4, 5)] == [1, 0, 1]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 2000])
def test_every_proof_verifies(n: int) -> None:
    leaves = _leaves(n)
    tree = MerkleTree.build(leaves)
    assert tree.root == _reference_root(leaves)
    for i in range(n) if n < 100 else (0, 1, 999, 1023, 1024, 1999):
        proof = tree.proof(i)
        verify_proof(tree.root, leaves[i], proof, i, n)
        assert len(proof) == proof_length(i, n) <= max(1, (n - 1).bit_length())


def test_tampering_fails() -> None:
    leaves = _leaves(10)
    tree = MerkleTree.build(leaves)
    proof = tree.proof(3)
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[4], proof, 3, 10)
    bad = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[3], bad, 3, 10)
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[3], proof[:-1], 3, 10)
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[3], [*proof, proof[0]], 3, 10)
    with pytest.raises(ProofError):
        root_from_proof(leaves[3], [b"\x00" * 31, *proof[1:]], 3, 10)
    with pytest.raises(ProofError):
        root_from_proof(leaves[3], [b"\x00" * 32] * 65, 3, 10)
    with pytest.raises(ProofError):
        root_from_proof(leaves[3], proof, 10, 10)
    with pytest.raises(ProofError):
        MerkleTree.build([])
    with pytest.raises(ProofError):
        tree.proof(10)
    with pytest.raises(ProofError):
        leaf_hash(-1, b"\x00" * 32)


def test_sorted_pair_attack_fails() -> None:
    """With OpenZeppelin's sorted pairs, the proof of leaf 0 also proves leaf 1 at position 0
    (its sibling); a positional proof proves one position only."""
    leaves = _leaves(4)
    tree = MerkleTree.build(leaves)
    swapped = [leaves[0], *tree.proof(0)[1:]]
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[1], swapped, 0, 4)
    verify_proof(tree.root, leaves[1], tree.proof(1), 1, 4)
    with pytest.raises(ProofError):  # the right leaf, claimed at another position
        verify_proof(tree.root, leaves[1], tree.proof(1), 0, 4)


@given(st.integers(1, 300), st.data())
def test_property_proofs(n: int, data: st.DataObject) -> None:
    leaves = _leaves(n)
    tree = MerkleTree.build(leaves)
    i = data.draw(st.integers(0, n - 1))
    assert root_from_proof(leaves[i], tree.proof(i), i, n) == tree.root
    j = data.draw(st.integers(0, n - 1))
    if j != i:
        with pytest.raises(ProofError):
            verify_proof(tree.root, leaves[j], tree.proof(i), i, n)
        with pytest.raises(ProofError):
            verify_proof(tree.root, leaves[i], tree.proof(i), j, n)


@given(
    st.lists(st.binary(min_size=0, max_size=40), max_size=70),
    st.binary(max_size=40),
    st.integers(-2, 1 << 20),
    st.integers(-2, 1 << 20),
)
def test_hostile_proofs_raise_proof_error(
    proof: list[bytes], leaf: bytes, index: int, count: int
) -> None:
    with pytest.raises(ProofError):
        verify_proof(keccak(b"root"), leaf, proof, index, count)
