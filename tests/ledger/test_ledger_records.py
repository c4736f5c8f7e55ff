"""EIP-712 records: cross-checked against eth_account; signatures; the batch calldata codec."""

from __future__ import annotations

import random
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_hash.auto import keccak as eth_keccak
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import RecordError, SignatureError
from secure_ci.ledger._calldata import BatchRecords, decode_batch, encode_batch
from secure_ci.ledger._records import (
    LedgerDomain,
    Signer,
    TaskRequest,
    address_of,
    commitment,
    keccak256,
    recover_signer,
    sign_digest,
)
from secure_ci.testing import sample_tasks

KEY = bytes(range(1, 33))
DOMAIN = LedgerDomain(31337, bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3"))
EDGE_KEY = keccak256(b"edge")


def _typed(obj: Any, type_string: str) -> dict[str, Any]:
    name, _, body = type_string.partition("(")
    fields = [f.split(" ") for f in body.rstrip(")").split(",")]
    message = {}
    for (typ, fname), attr in zip(fields, type(obj).__slots__, strict=True):
        value = getattr(obj, attr)
        message[fname] = "0x" + value.hex() if typ == "address" else value
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            name: [{"name": f, "type": t} for t, f in fields],
        },
        "primaryType": name,
        "domain": {
            "name": "secure-ci",
            "version": "1",
            "chainId": DOMAIN.chain_id,
            "verifyingContract": "0x" + DOMAIN.contract.hex(),
        },
        "message": message,
    }


def test_digests_and_signatures_match_eth_account() -> None:
    from secure_ci.ledger._records import REQUEST_TYPE, RESULT_TYPE

    entry = sample_tasks(1, edge_key=EDGE_KEY, domain=DOMAIN)[0]
    for obj, type_string in ((entry.request, REQUEST_TYPE), (entry.result, RESULT_TYPE)):
        full = _typed(obj, type_string)
        assert _hash_eip191_message(encode_typed_data(full_message=full)) == obj.digest(DOMAIN)
        theirs = Account.sign_typed_data(KEY, full_message=full).signature
        assert obj.sign(KEY, DOMAIN) == bytes(theirs)
        assert obj.recover(bytes(theirs), DOMAIN) == bytes.fromhex(
            Account.from_key(KEY).address[2:]
        )


def test_address_of_matches_eth_account() -> None:
    assert "0x" + address_of(KEY).hex() == Account.from_key(KEY).address.lower()


def test_result_binds_request_and_commitment_is_salted() -> None:
    entry = sample_tasks(1, edge_key=EDGE_KEY, domain=DOMAIN)[0]
    assert entry.result.matches(entry.request)
    assert entry.record_hash == entry.result.digest(DOMAIN)
    assert commitment(b"\x01" * 32, b"x") != commitment(b"\x02" * 32, b"x")
    with pytest.raises(RecordError):
        commitment(b"short", b"x")


def test_recover_rejects_high_s_bad_v_and_garbage() -> None:
    digest = keccak256(b"m")
    sig = sign_digest(KEY, digest)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(sig[32:64], "big")
    assert s <= n // 2
    assert sig[64] in (27, 28)
    high = sig[:32] + (n - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    for bad in (high, sig[:64] + b"\x01", sig[:10], b"\x00" * 65):
        with pytest.raises(SignatureError):
            recover_signer(bad, digest)
    assert recover_signer(sig, keccak256(b"other")) != address_of(KEY)


@given(st.binary(min_size=0, max_size=40), st.integers(min_value=-1, max_value=1 << 70))
def test_constructors_reject_bad_fields(raw: bytes, number: int) -> None:
    good32, good20 = b"\x00" * 32, b"\x00" * 20
    ok = len(raw) == 32 and 0 <= number < 1 << 64
    try:
        TaskRequest(raw, good20, number, good32, 1, good32, good20, 0)
    except RecordError:
        assert not ok
    else:
        assert ok


def _batch(n: int, seed: int = 0) -> BatchRecords:
    entries = sample_tasks(n, edge_key=EDGE_KEY, domain=DOMAIN, first_seq=7, seed=seed)
    return BatchRecords(address_of(EDGE_KEY), 7, tuple(e.anchored() for e in entries))


def test_calldata_roundtrip_and_size() -> None:
    batch = _batch(50)
    data = encode_batch(batch)
    assert decode_batch(data) == batch
    # 190 bytes per record plus a small header and tables
    assert len(data) < 50 * 190 + 400
    linked = BatchRecords(batch.edge, 7, batch.records, (b"\x33" * 32, 2))
    assert decode_batch(encode_batch(linked)) == linked


def test_calldata_encoder_rejects_foreign_records() -> None:
    batch = _batch(3)
    with pytest.raises(RecordError):
        encode_batch(BatchRecords(batch.edge, 8, batch.records))
    with pytest.raises(RecordError):
        encode_batch(BatchRecords(b"\x01" * 20, 7, batch.records))
    with pytest.raises(RecordError):
        encode_batch(BatchRecords(batch.edge, 7, ()))


VALID = encode_batch(_batch(6))


@given(st.binary(max_size=2000))
def test_decoder_rejects_garbage(data: bytes) -> None:
    try:
        decode_batch(data)
    except RecordError:
        return
    assert encode_batch(decode_batch(data)) == data


@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(1, 255))
def test_decoder_single_byte_mutations(pos: int, xor: int) -> None:
    mutated = bytearray(VALID)
    mutated[pos] ^= xor
    try:
        batch = decode_batch(bytes(mutated))
    except RecordError:
        return
    # whatever still parses is canonical and different from the original
    assert encode_batch(batch) == bytes(mutated)
    assert batch != decode_batch(VALID)


def test_decoder_mutation_fuzz_truncation_and_splices() -> None:
    rng = random.Random(5)
    for _ in range(500):
        data = bytearray(VALID)
        op = rng.randrange(3)
        if op == 0:
            data = data[: rng.randrange(len(data))]
        elif op == 1:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randrange(1, 40))
        else:
            at = rng.randrange(len(data) - 8)
            data[at : at + 8] = rng.randbytes(8)
        try:
            decode_batch(bytes(data))
        except RecordError:
            continue
    with pytest.raises(RecordError):
        decode_batch(VALID + b"\x00")
    with pytest.raises(RecordError):
        decode_batch(b"\x01\x00" + b"\xff" * 10_000_000)


def test_signer_matches_raw_key_signing() -> None:
    signer = Signer(KEY)
    digest = keccak256(b"d")
    assert signer.address == address_of(KEY)
    assert signer.sign(digest) == sign_digest(KEY, digest)
    assert recover_signer(signer.sign(digest), digest) == signer.address
    with pytest.raises(SignatureError):
        Signer(b"\x00" * 32)


@given(st.binary(max_size=4096))
def test_keccak256_matches_eth_hash(data: bytes) -> None:
    assert keccak256(data) == eth_keccak(data)
