"""The device receipts file an auditor reads (``audit verify --receipts``): round trip, strict
validation with specific errors, signature checks before anything is compared, and property
tests that random and mutated files are rejected (or read back unchanged), never crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import RecordError, SignatureError
from secure_ci.ledger._audit_receipts import (
    MAX_RECEIPTS_FILE_BYTES,
    RECEIPTS_FORMAT,
    DeviceReceipt,
    encode_receipts,
    parse_receipts,
)
from secure_ci.ledger._records import (
    LedgerDomain,
    TaskRequest,
    TaskResult,
    address_of,
    keccak256,
    task_id_for,
)

DOMAIN = LedgerDomain(31337, b"\x42" * 20)
DEVICE_KEY, EDGE_KEY = keccak256(b"receipts device"), keccak256(b"receipts edge")
DEVICE, EDGE = address_of(DEVICE_KEY), address_of(EDGE_KEY)


def _receipt(n: int, *, edge_key: bytes = EDGE_KEY, output: bytes = b"out") -> DeviceReceipt:
    input_c = keccak256(b"in" + bytes([n]))
    request = TaskRequest(
        task_id_for(DEVICE, input_c), DEVICE, n, keccak256(b"model"), 3, input_c, EDGE,
        1_700_000_000 + n, keccak256(bytes([n])) if n else bytes(32),
    )  # fmt: skip
    result = TaskResult(
        request.task_id, request.struct_hash(), keccak256(output), keccak256(b"m"),
        keccak256(b"q"), 0, 12, 100 + n,
    )  # fmt: skip
    return DeviceReceipt(
        request, result, request.sign(DEVICE_KEY, DOMAIN), result.sign(edge_key, DOMAIN)
    )


RECEIPTS = [_receipt(n) for n in range(3)]
FILE = encode_receipts(DOMAIN, RECEIPTS)


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(FILE)
    return doc


def _dump(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_round_trip() -> None:
    assert parse_receipts(FILE, DOMAIN) == RECEIPTS
    assert parse_receipts(encode_receipts(DOMAIN, []), DOMAIN) == []
    assert json.loads(FILE)["format"] == RECEIPTS_FORMAT


def _set(path: tuple[Any, ...], value: object) -> bytes:
    doc = _doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return _dump(doc)


def _drop(path: tuple[Any, ...]) -> bytes:
    doc = _doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return _dump(doc)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "receipts file must be a JSON object"),
        (b"[" * 100_000, "nests deeper than 8"),
        (b'{"a": ' * 50_000, "nests deeper than 8"),
        (_set(("format",), "secure-ci/device-receipts/v2"), "format must be"),
        (_set(("chain_id",), 1), "not the audited chain"),
        (_set(("contract",), "0x" + "43" * 20), "not the audited chain"),
        (_set(("contract",), "0x" + "4A" * 20), "contract must be 0x and 40 lowercase hex"),
        (_set(("chain_id",), True), "chain_id must be an integer"),
        (_set(("chain_id",), 31337.0), "chain_id must be an integer"),
        (_set(("receipts",), {}), "receipts must be a JSON list"),
        (_set(("extra",), 1), "unknown keys \\['extra'\\]"),
        (_drop(("receipts", 0, "edge_sig")), "receipt 0: missing keys \\['edge_sig'\\]"),
        (_drop(("receipts", 1, "request", "cut")), "receipt 1.request: missing keys"),
        (_set(("receipts", 2, "result", "status"), 256), "receipt 2.result.status must be"),
        (_set(("receipts", 0, "request", "cut"), -1), "receipt 0.request.cut must be"),
        (_set(("receipts", 0, "request", "device_seq"), "1"), "device_seq must be an integer"),
        (_set(("receipts", 0, "result", "task_id"), "0x" + "00" * 31), "task_id must be 0x"),
        (_set(("receipts", 0, "device_sig"), None), "device_sig must be 0x"),
        (_set(("receipts", 0), []), "receipt 0 must be a JSON object"),
        (
            _set(("receipts", 0, "result", "task_id"), "0x" + "11" * 32),
            "receipt 0: the result does not answer the request",
        ),
        (FILE.replace(b'"chain_id"', b'"chain_id": 1, "chain_id"', 1), "appears twice"),
        (FILE.replace(b"31337", b"NaN", 1), "not a JSON number"),
        (FILE.replace(b"31337", b"1" * 5000, 1), "not valid"),
    ],
)
def test_malformed_files_get_a_specific_error(data: bytes, match: str) -> None:
    with pytest.raises(RecordError, match=match):
        parse_receipts(data, DOMAIN)


def test_size_limits() -> None:
    with pytest.raises(RecordError, match="larger than 100 bytes"):
        parse_receipts(FILE, DOMAIN, max_bytes=100)
    assert parse_receipts(FILE, DOMAIN, max_bytes=len(FILE)) == RECEIPTS
    with pytest.raises(RecordError, match=f"larger than {MAX_RECEIPTS_FILE_BYTES}"):
        parse_receipts(b" " * (MAX_RECEIPTS_FILE_BYTES + 1), DOMAIN)
    with pytest.raises(RecordError, match="more than 40000 receipts"):
        parse_receipts(_set(("receipts",), [0] * 40_001), DOMAIN)


def test_signatures_are_checked_before_anything_is_compared() -> None:
    other_edge = _receipt(1, edge_key=keccak256(b"another edge"), output=b"framed")
    with pytest.raises(SignatureError, match="receipt 1: the result is not signed by the req"):
        parse_receipts(encode_receipts(DOMAIN, [RECEIPTS[0], other_edge]), DOMAIN)
    # a changed output commitment under the edge's signature of the original
    doc = _doc()
    doc["receipts"][2]["result"]["output_commitment"] = "0x" + keccak256(b"framed").hex()
    with pytest.raises(SignatureError, match="receipt 2: the result is not signed"):
        parse_receipts(_dump(doc), DOMAIN)
    # a malleable (high s) signature does not recover
    sig = bytearray(RECEIPTS[0].edge_sig)
    sig[64] = 29
    with pytest.raises(SignatureError, match="receipt 0: a signature does not recover"):
        parse_receipts(_set(("receipts", 0, "edge_sig"), "0x" + sig.hex()), DOMAIN)
    # the same receipts for another contract are refused before their signatures are read
    other = LedgerDomain(31337, b"\x43" * 20)
    with pytest.raises(RecordError, match="not the audited chain"):
        parse_receipts(FILE, other)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(RecordError):
        parse_receipts(data, DOMAIN)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["flip", "truncate", "insert", "splice"]),
    st.integers(0, 1 << 20),
    st.binary(min_size=1, max_size=16),
)
def test_mutated_files_are_rejected_or_read_back_unchanged(
    how: str, where: int, data: bytes
) -> None:
    """No mutation of a valid file yields a receipt it did not hold: the parser either
    rejects it with a library error or reads the very same receipts (e.g. whitespace)."""
    pos = where % len(FILE)
    bad = {
        "flip": FILE[:pos] + bytes([FILE[pos] ^ (data[0] or 1)]) + FILE[pos + 1 :],
        "truncate": FILE[:pos],
        "insert": FILE[:pos] + data + FILE[pos:],
        "splice": FILE[:pos] + data + FILE[pos + len(data) :],
    }[how]
    try:
        parsed = parse_receipts(bad, DOMAIN)
    except (RecordError, SignatureError):
        return
    assert parsed == RECEIPTS


_HEX_FIELD = st.sampled_from(
    [
        ("request", "task_id"), ("request", "input_commitment"), ("request", "edge"),
        ("request", "device"), ("result", "output_commitment"), ("result", "request_hash"),
        ("result", "quote_id"),
    ]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2), _HEX_FIELD, st.binary(min_size=1, max_size=32))
def test_any_changed_field_breaks_a_signature(index: int, field: tuple[str, str], x: bytes) -> None:
    """Changing any signed field of a receipt is caught (the result stops answering its
    request, or a signature stops recovering to the right key)."""
    doc = _doc()
    obj = doc["receipts"][index][field[0]]
    old = bytes.fromhex(obj[field[1]][2:])
    new = bytes(a ^ b for a, b in zip(old, x[: len(old)].ljust(len(old), b"\x00"), strict=True))
    if new == old:
        return
    obj[field[1]] = "0x" + new.hex()
    with pytest.raises((RecordError, SignatureError)):
        parse_receipts(_dump(doc), DOMAIN)
