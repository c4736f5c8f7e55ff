"""EIP-712 records: cross-checked against eth_account; signatures; the batch calldata codec."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_hash.auto import keccak as eth_keccak
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import RecordError, SignatureError
from secure_ci.ledger._calldata import (
    SIGNATURE_INTERVAL,
    BatchRecords,
    chain_links,
    decode_batch,
    encode_batch,
    published,
)
from secure_ci.ledger._records import (
    LedgerDomain,
    Signer,
    TaskRequest,
    address_of,
    commitment,
    keccak256,
    recover_signer,
    sign_digest,
    task_id_for,
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


def _batch(n: int, seed: int = 0, *, chained: bool = True, devices: int = 4) -> BatchRecords:
    entries = sample_tasks(
        n, edge_key=EDGE_KEY, domain=DOMAIN, first_seq=7, seed=seed, chained=chained,
        devices=devices,
    )  # fmt: skip
    return BatchRecords(address_of(EDGE_KEY), 7, tuple(e.anchored() for e in entries))


def test_calldata_roundtrip_and_size() -> None:
    batch = _batch(200)
    data = encode_batch(batch)
    decoded = decode_batch(data)
    assert decoded == published(batch)
    assert [r.request for r in decoded.records] == [r.request for r in batch.records]
    # four chains of 50: a signature at each chain's end and every SIGNATURE_INTERVAL-th link
    kept = [i for i, r in enumerate(decoded.records) if r.device_sig]
    assert len(kept) == 4 + 4 * (50 // SIGNATURE_INTERVAL)
    assert all(decoded.records[i].device_sig == batch.records[i].device_sig for i in kept)
    # two commitments plus ~30 bytes of small fields per record, signatures amortised
    assert len(data) < 200 * 100 + 4 * 65 * 3 + 400
    linked = BatchRecords(batch.edge, 7, batch.records, (b"\x33" * 32, 2))
    assert decode_batch(encode_batch(linked)) == published(linked)


def test_calldata_unchained_records_keep_every_signature() -> None:
    batch = _batch(20, chained=False)
    data = encode_batch(batch)
    assert decode_batch(data) == batch
    assert len(data) > 20 * (95 + 32 + 65)


def test_calldata_chain_links_need_the_same_device_and_the_exact_hash() -> None:
    batch = _batch(8, devices=2)
    assert chain_links(batch.records) == [-1, -1, 0, 1, 2, 3, 4, 5]
    records = list(batch.records)
    # a request of another device naming device 0's request as its predecessor starts a chain
    other = replace(records[3].request, prev_request=records[0].result.request_hash)
    records[3] = _rebuilt(records[3], other)
    assert chain_links(records)[3] == -1
    data = encode_batch(BatchRecords(batch.edge, 7, tuple(records)))
    assert decode_batch(data).records[3].request == other


def test_calldata_explicit_task_ids_roundtrip() -> None:
    batch = _batch(6)
    records = list(batch.records)
    request = replace(records[4].request, task_id=b"\x42" * 32)
    assert request.task_id != task_id_for(request.device, request.input_commitment)
    records[4] = _rebuilt(records[4], request)
    mixed = BatchRecords(batch.edge, 7, tuple(records))
    assert decode_batch(encode_batch(mixed)) == published(mixed)
    assert len(encode_batch(mixed)) == len(encode_batch(batch)) + 32


def test_calldata_encoder_needs_the_signatures_it_keeps() -> None:
    batch = _batch(8)
    records = list(batch.records)
    records[-1] = replace(records[-1], device_sig=b"")
    with pytest.raises(RecordError, match="signature"):
        encode_batch(BatchRecords(batch.edge, 7, tuple(records)))


@given(
    st.integers(1, 70),
    st.integers(1, 5),
    st.booleans(),
    st.lists(st.integers(0, 69), max_size=6),
)
def test_calldata_roundtrips_any_chain_shape(
    n: int, devices: int, chained: bool, shuffled: list[int]
) -> None:
    records = list(_batch(n, chained=chained, devices=devices).records)
    # journal order need not be chain order: move some records later (new seq numbers)
    for i in shuffled:
        if i < len(records):
            records.append(records.pop(i))
    records = [replace(r, result=replace(r.result, edge_seq=7 + k)) for k, r in enumerate(records)]
    batch = BatchRecords(address_of(EDGE_KEY), 7, tuple(records))
    assert decode_batch(encode_batch(batch)) == published(batch)


def _rebuilt(record: Any, request: TaskRequest) -> Any:
    result = replace(record.result, task_id=request.task_id, request_hash=request.struct_hash())
    return replace(record, request=request, result=result)


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
