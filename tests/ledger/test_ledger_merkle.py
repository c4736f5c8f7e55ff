"""Merkle trees with OpenZeppelin's sorted-pair hashing and double-hashed, sequenced leaves."""

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
    root_from_proof,
    verify_proof,
)


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i, keccak(i.to_bytes(4, "big"))) for i in range(n)]


def test_leaf_and_head_match_abi_encode() -> None:
    record = keccak(b"r")
    assert leaf_hash(5, record) == keccak(keccak(encode(["uint64", "bytes32"], [5, record])))
    head = chain_head(b"\x01" * 32, b"\x02" * 32, 10, 3)
    expected = keccak(
        encode(["bytes32", "bytes32", "uint64", "uint32"], [b"\x01" * 32, b"\x02" * 32, 10, 3])
    )
    assert head == expected


def _oz_process_proof(leaf: bytes, proof: list[bytes]) -> bytes:
    # OpenZeppelin MerkleProof.processProof, written independently of _merkle
    computed = leaf
    for p in proof:
        a, b = sorted((computed, p))
        computed = keccak(a + b)
    return computed


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33])
def test_every_proof_verifies(n: int) -> None:
    leaves = _leaves(n)
    tree = MerkleTree.build(leaves)
    for i, leaf in enumerate(leaves):
        proof = tree.proof(i)
        assert _oz_process_proof(leaf, proof) == tree.root
        verify_proof(tree.root, leaf, proof)
        assert len(proof) <= max(1, (n - 1).bit_length())


def test_tampering_fails() -> None:
    leaves = _leaves(10)
    tree = MerkleTree.build(leaves)
    proof = tree.proof(3)
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[4], proof)
    bad = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[3], bad)
    with pytest.raises(ProofError):
        verify_proof(tree.root, leaves[3], proof[:-1])
    with pytest.raises(ProofError):
        root_from_proof(leaves[3], [b"\x00" * 31])
    with pytest.raises(ProofError):
        root_from_proof(leaves[3], [b"\x00" * 32] * 65)
    with pytest.raises(ProofError):
        MerkleTree.build([])
    with pytest.raises(ProofError):
        tree.proof(10)
    with pytest.raises(ProofError):
        leaf_hash(-1, b"\x00" * 32)


@given(st.integers(1, 200), st.data())
def test_property_proofs(n: int, data: st.DataObject) -> None:
    leaves = _leaves(n)
    tree = MerkleTree.build(leaves)
    i = data.draw(st.integers(0, n - 1))
    assert root_from_proof(leaves[i], tree.proof(i)) == tree.root
    j = data.draw(st.integers(0, n - 1))
    if j != i:
        assert root_from_proof(leaves[j], tree.proof(i)) != tree.root


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=70), st.binary(max_size=40))
def test_hostile_proofs_raise_proof_error(proof: list[bytes], leaf: bytes) -> None:
    try:
        verify_proof(keccak(b"root"), leaf, proof)
    except ProofError:
        return
    raise AssertionError("a random proof verified")
