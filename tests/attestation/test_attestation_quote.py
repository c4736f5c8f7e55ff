"""The strict quote parser: fields of real quotes, every bound, hostile input."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct
from collections.abc import Callable

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.attestation import SgxReportBody, TdReportBody, parse_quote
from secure_ci.attestation._quote import MAX_QUOTE_BYTES, MAX_QUOTE_PADDING
from secure_ci.exceptions import EvidenceFormatError, UnsupportedEvidenceError

SGX = "sgx-v3-dcapqvl-sample.bin"
TDX = "tdx-v4-dcapqvl-sample.bin"
V5 = "tdx-v5-gotdxguest-sample.bin"


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def test_sgx_fields(vector: Callable[[str], bytes]) -> None:
    raw = vector(SGX)
    q = parse_quote(raw)
    assert isinstance(q.body, SgxReportBody)
    assert (q.version, q.tee, q.att_key_type, q.trailing) == (3, "sgx", 2, 0)
    assert q.body.mrenclave.hex().startswith("33d8736d")
    assert q.body.report_data.startswith(b"Hello, world!")
    assert q.signed_region == raw[:432]
    assert q.quote_id == hashlib.sha256(raw[:432]).hexdigest()
    leaf = x509.load_der_x509_certificate(q.pck_leaf_der())
    assert "PCK Certificate" in leaf.subject.rfc4514_string()


def test_tdx_v4_fields_and_trailing_padding(vector: Callable[[str], bytes]) -> None:
    raw = vector(TDX)
    assert raw[-70:] == bytes(70)
    q = parse_quote(raw)
    assert isinstance(q.body, TdReportBody)
    assert (q.version, q.tee, q.trailing, q.cert_data_type) == (4, "tdx", 70, 5)
    assert q.signed_region == raw[:632]
    assert len(q.body.rtmrs) == 4
    assert all(len(r) == 48 for r in q.body.rtmrs)
    assert parse_quote(raw[:-70]).quote_id == q.quote_id


def test_tdx_v5_td15_body(vector: Callable[[str], bytes]) -> None:
    q = parse_quote(vector(V5))
    assert isinstance(q.body, TdReportBody)
    assert q.version == 5
    assert len(q.signed_region) == 48 + 6 + 648


@pytest.mark.parametrize(
    ("offset", "value", "error", "match"),
    [
        (0, struct.pack("<H", 2), UnsupportedEvidenceError, "version 2"),
        (0, struct.pack("<H", 6), UnsupportedEvidenceError, "version 6"),
        (2, struct.pack("<H", 3), UnsupportedEvidenceError, "key type 3"),
        (4, struct.pack("<I", 0x81), UnsupportedEvidenceError, "must carry an SGX"),
        (4, struct.pack("<I", 7), UnsupportedEvidenceError, "TEE type"),
        (12, bytes(16), UnsupportedEvidenceError, "vendor"),
        (432, struct.pack("<I", 0xFFFFFFFF), EvidenceFormatError, "truncated"),
        (432, struct.pack("<I", 100), EvidenceFormatError, "truncated"),
    ],
)
def test_header_and_length_fields(
    vector: Callable[[str], bytes], offset: int, value: bytes, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        parse_quote(_patch(vector(SGX), offset, value))


def test_v4_sgx_and_v5_body_checks(vector: Callable[[str], bytes]) -> None:
    tdx = vector(TDX)
    with pytest.raises(UnsupportedEvidenceError, match="only supported for TDX"):
        parse_quote(_patch(tdx, 4, bytes(4)))
    v5 = vector(V5)
    with pytest.raises(UnsupportedEvidenceError, match="body type 9"):
        parse_quote(_patch(v5, 48, struct.pack("<H", 9)))
    with pytest.raises(EvidenceFormatError, match="must be 648"):
        parse_quote(_patch(v5, 50, struct.pack("<I", 584)))
    with pytest.raises(EvidenceFormatError, match="does not match"):
        parse_quote(_patch(v5, 4, bytes(4)))


def test_cert_data_types(vector: Callable[[str], bytes]) -> None:
    sgx = vector(SGX)
    auth_len = int.from_bytes(sgx[436 + 128 + 384 + 64 : 436 + 128 + 384 + 66], "little")
    cert_type_at = 436 + 128 + 384 + 64 + 2 + auth_len
    with pytest.raises(UnsupportedEvidenceError, match="type 3"):
        parse_quote(_patch(sgx, cert_type_at, struct.pack("<H", 3)))
    with pytest.raises(EvidenceFormatError, match="truncated"):
        parse_quote(_patch(sgx, cert_type_at + 2, struct.pack("<I", 1 << 20)))
    tdx = vector(TDX)
    with pytest.raises(UnsupportedEvidenceError, match="outer certification data type 5"):
        parse_quote(_patch(tdx, 636 + 128, struct.pack("<H", 5)))


@pytest.mark.parametrize("cut", [0, 1, 47, 48, 431, 432, 435, 436, 600, 1000, 4599])
def test_every_truncation_is_refused(vector: Callable[[str], bytes], cut: int) -> None:
    with pytest.raises(EvidenceFormatError):
        parse_quote(vector(SGX)[:cut])


def test_trailing_bytes_and_size_limit(vector: Callable[[str], bytes]) -> None:
    raw = vector(SGX)
    assert parse_quote(raw + b"\0").trailing == 1
    assert parse_quote(raw + bytes(MAX_QUOTE_PADDING)).trailing == MAX_QUOTE_PADDING
    with pytest.raises(EvidenceFormatError, match=f"{MAX_QUOTE_PADDING + 1} bytes of zero padding"):
        parse_quote(raw + bytes(MAX_QUOTE_PADDING + 1))
    with pytest.raises(EvidenceFormatError, match=f"non-zero byte 0x01 at offset {len(raw)}, 0 "):
        parse_quote(raw + b"\1")
    with pytest.raises(EvidenceFormatError, match=f"non-zero byte 0x80 at offset {len(raw) + 9}"):
        parse_quote(raw + bytes(9) + b"\x80" + bytes(9))
    with pytest.raises(EvidenceFormatError, match="exceeds"):
        parse_quote(raw + bytes(MAX_QUOTE_BYTES))
    with pytest.raises(EvidenceFormatError, match="must be bytes"):
        parse_quote("not bytes")  # type: ignore[arg-type]


_PADDED = st.sampled_from([SGX, TDX, V5, "tdx-v4-automata-quotev4.hex"])


def _unpadded(raw: bytes) -> bytes:
    return raw[: len(raw) - parse_quote(raw).trailing]


@given(
    name=_PADDED,
    trailer=st.binary(min_size=1, max_size=2 * MAX_QUOTE_PADDING).filter(lambda b: any(b)),
)
def test_any_nonzero_trailing_byte_is_refused(
    vector: Callable[[str], bytes], name: str, trailer: bytes
) -> None:
    raw = _unpadded(vector(name))
    with pytest.raises(EvidenceFormatError, match="non-zero byte"):
        parse_quote(raw + trailer)


@given(
    name=_PADDED,
    zeros=st.integers(0, MAX_QUOTE_PADDING),
    where=st.integers(0, MAX_QUOTE_PADDING),
    byte=st.integers(1, 255),
)
def test_zero_padding_accepted_up_to_bound_and_one_byte_spoils_it(
    vector: Callable[[str], bytes], name: str, zeros: int, where: int, byte: int
) -> None:
    raw = _unpadded(vector(name))
    q = parse_quote(raw + bytes(zeros))
    assert q.trailing == zeros
    assert q.quote_id == parse_quote(raw).quote_id
    spoiled = bytearray(raw + bytes(max(zeros, 1)))
    at = len(raw) + where % max(zeros, 1)
    spoiled[at] = byte
    with pytest.raises(EvidenceFormatError, match=f"non-zero byte {byte:#04x} at offset {at},"):
        parse_quote(bytes(spoiled))


@given(name=_PADDED, extra=st.integers(1, MAX_QUOTE_BYTES))
def test_zero_padding_beyond_bound_is_refused(
    vector: Callable[[str], bytes], name: str, extra: int
) -> None:
    raw = _unpadded(vector(name))
    with pytest.raises(EvidenceFormatError, match="exceed"):
        parse_quote(raw + bytes(MAX_QUOTE_PADDING + extra))


def test_leaf_without_pem_is_refused(vector: Callable[[str], bytes]) -> None:
    q = parse_quote(vector("SYNTHETIC-tdx-v4-intel-qvl-sample-test-root.bin"))
    with pytest.raises(EvidenceFormatError, match="strict PEM"):
        q.pck_leaf_der()


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        (b"\n", b"\x0b", "strict PEM"),  # PEM parsers read \x0b as whitespace
        (b"\n", b"\r\n", "strict PEM"),
        (b"=\n-----END", b"\n-----END", "base64"),
        (b"-----END CERTIFICATE-----\n\0", b"-----END CERTIFICATE-----\nXX", "strict PEM"),
    ],
)
def test_pck_chain_has_one_byte_form(
    vector: Callable[[str], bytes], old: bytes, new: bytes, match: str
) -> None:
    q = parse_quote(vector(SGX))
    assert len(q.pck_chain_der()) == 3
    mutated = q.pck_chain.replace(old, new, 1)
    assert mutated != q.pck_chain
    with pytest.raises(EvidenceFormatError, match=match):
        dataclasses.replace(q, pck_chain=mutated).pck_chain_der()


def test_pck_chain_non_canonical_base64(vector: Callable[[str], bytes]) -> None:
    q = parse_quote(vector(SGX))
    first_end = q.pck_chain.index(b"\n-----END")
    last = q.pck_chain[first_end - 1 : first_end]
    # the last base64 char before the end carries unused low bits when the block ends with '='
    tail = q.pck_chain[first_end - 3 : first_end]
    if not tail.endswith(b"="):
        pytest.skip("leaf block has no padding")
    idx = first_end - (2 if tail.endswith(b"==") else 1) - 1
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    bumped = alphabet[
        alphabet.index(q.pck_chain[idx]) ^ 1 : alphabet.index(q.pck_chain[idx]) ^ 1 + 1
    ]
    mutated = q.pck_chain[:idx] + bumped + q.pck_chain[idx + 1 :]
    assert last
    with pytest.raises(EvidenceFormatError, match="non-canonical"):
        dataclasses.replace(q, pck_chain=mutated).pck_chain_der()


@given(st.binary(max_size=6000))
def test_arbitrary_bytes_only_format_errors(data: bytes) -> None:
    with contextlib.suppress(EvidenceFormatError):
        parse_quote(data)


def _mutations() -> st.SearchStrategy[tuple[str, str, int, int]]:
    names = st.sampled_from([SGX, TDX, V5, "tdx-v4-automata-quotev4.hex"])
    kind = st.sampled_from(["flip", "cut", "set32", "insert"])
    return st.tuples(names, kind, st.integers(0, 8000), st.integers(0, 0xFFFFFFFF))


@given(_mutations())
def test_mutated_real_quotes_only_format_errors(
    vector: Callable[[str], bytes], mutation: tuple[str, str, int, int]
) -> None:
    name, kind, pos, value = mutation
    raw = bytearray(vector(name))
    pos %= len(raw)
    if kind == "flip":
        raw[pos] ^= 1 << (value % 8)
    elif kind == "cut":
        del raw[pos:]
    elif kind == "set32":
        raw[pos : pos + 4] = value.to_bytes(4, "little")
    else:
        raw[pos:pos] = value.to_bytes(4, "little")
    try:
        q = parse_quote(bytes(raw))
    except EvidenceFormatError:
        return
    assert q.version in (3, 4, 5)
    with contextlib.suppress(EvidenceFormatError):
        q.pck_leaf_der()
