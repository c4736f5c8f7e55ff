"""RA-TLS certificates: Gramine's quote extension and TCG DICE evidence, key and nonce binding."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.attestation import (
    DevPKI,
    SimulatedProvider,
    extract_evidence,
    fresh_evidence,
    make_ratls_certificate,
    parse_quote,
    ratls_report_data,
    verify_quote,
    verify_ratls_certificate,
)
from secure_ci.attestation._ratls import (
    DICE_EVIDENCE_OID,
    GRAMINE_LEGACY_QUOTE_OID,
    RATLS_QUOTE_OID,
    spki_der_of,
)
from secure_ci.exceptions import (
    AttestationError,
    ConfigError,
    EvidenceFormatError,
    EvidenceSignatureError,
    ReportDataError,
    UnsupportedEvidenceError,
)
from secure_ci.testing import DEV_MRENCLAVE, DEV_NOW, dev_pki, dev_policy, dev_provider

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])


@pytest.fixture(scope="module")
def pki() -> DevPKI:
    return dev_pki()


@pytest.fixture(scope="module")
def provider(pki: DevPKI) -> SimulatedProvider:
    return dev_provider(pki)


def _verify(pki: DevPKI, cert_der: bytes, **kw: Any) -> Any:
    kw.setdefault("now", DEV_NOW)
    return verify_ratls_certificate(
        cert_der, collateral=pki.collateral, policy=dev_policy(pki), **kw
    )


def _self_signed(
    extensions: list[tuple[x509.ObjectIdentifier, bytes]],
    *,
    key: Any = None,
    signer: Any = None,
    days: int = 1,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(DEV_NOW, dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start - dt.timedelta(minutes=1))
        .not_valid_after(start + dt.timedelta(days=days))
    )
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    from cryptography.hazmat.primitives.serialization import Encoding

    return builder.sign(signer or key, hashes.SHA256()).public_bytes(Encoding.DER)


@pytest.mark.parametrize("encoding", ["quote", "dice"])
@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_round_trip(pki: DevPKI, provider: SimulatedProvider, encoding: Any, curve: Any) -> None:
    creds = make_ratls_certificate(provider, now=DEV_NOW, curve=curve, encoding=encoding)
    evidence = extract_evidence(creds.cert_der)
    assert evidence.quote == creds.quote
    assert evidence.spki_der == spki_der_of(creds.key)
    assert evidence.encoding == encoding
    enclave = _verify(pki, creds.cert_der)
    assert enclave.mrenclave == DEV_MRENCLAVE
    assert creds.cert_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" in creds.key_pem
    assert len(creds.cert_der) <= 6 * 1024


def test_quote_extension_is_gramine_format(provider: SimulatedProvider) -> None:
    """Raw quote in a non-critical extension; report_data[0:32] = SHA-256(SPKI DER)."""
    creds = make_ratls_certificate(provider, now=DEV_NOW)
    cert = x509.load_der_x509_certificate(creds.cert_der)
    ext = cert.extensions.get_extension_for_oid(RATLS_QUOTE_OID)
    assert not ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == creds.quote
    assert (
        parse_quote(creds.quote).report_data[:32] == hashlib.sha256(spki_der_of(creds.key)).digest()
    )
    # Gramine's verifier finds the evidence by searching the extension bytes for its OID
    # bytes (tag and length included) followed by OCTET STRING with a 2-byte long length.
    needle = bytes.fromhex("06092A864886F84D8A3906") + b"\x04\x82"
    at = creds.cert_der.find(needle)
    assert at > 0
    size = int.from_bytes(creds.cert_der[at + len(needle) : at + len(needle) + 2], "big")
    assert size == len(creds.quote)


def test_gramine_legacy_oid_is_read(pki: DevPKI, provider: SimulatedProvider) -> None:
    """Gramine's certificates carry the OID as 0.6.9.42.840.113741.1337.6 (its encoding bug)."""
    key = ec.generate_private_key(ec.SECP384R1())
    quote = provider.quote(ratls_report_data(spki_der_of(key)))
    cert_der = _self_signed([(GRAMINE_LEGACY_QUOTE_OID, quote)], key=key)
    assert bytes.fromhex("060B06092A864886F84D8A3906") in cert_der
    assert extract_evidence(cert_der).quote == quote
    assert _verify(pki, cert_der).mrenclave == DEV_MRENCLAVE


def test_dice_evidence_format(provider: SimulatedProvider) -> None:
    creds = make_ratls_certificate(provider, now=DEV_NOW, encoding="dice")
    cert = x509.load_der_x509_certificate(creds.cert_der)
    value = cert.extensions.get_extension_for_oid(DICE_EVIDENCE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    tagged = cbor2.loads(value.value)
    assert tagged.tag == 60000
    quote, claims = tagged.value
    assert quote == creds.quote
    entry = cbor2.loads(cbor2.loads(claims)["pubkey-hash"])
    assert list(entry) == [1, hashlib.sha256(spki_der_of(creds.key)).digest()]
    assert parse_quote(quote).report_data[:32] == hashlib.sha256(claims).digest()


@pytest.mark.parametrize("encoding", ["quote", "dice"])
def test_nonce_in_certificate(pki: DevPKI, provider: SimulatedProvider, encoding: Any) -> None:
    creds = make_ratls_certificate(provider, now=DEV_NOW, nonce=b"n-1", encoding=encoding)
    _verify(pki, creds.cert_der, nonce=b"n-1")
    with pytest.raises(ReportDataError):
        _verify(pki, creds.cert_der, nonce=b"n-2")


def test_fresh_evidence(pki: DevPKI, provider: SimulatedProvider) -> None:
    creds = make_ratls_certificate(provider, now=DEV_NOW)
    spki = spki_der_of(creds.key)
    quote = fresh_evidence(provider, spki, b"challenge")
    assert parse_quote(quote).report_data == ratls_report_data(spki, b"challenge")
    policy = dev_policy(pki, require_nonce=True)
    kw: dict[str, Any] = {"collateral": pki.collateral, "policy": policy, "now": DEV_NOW}
    verify_quote(quote, expected_key_spki=spki, nonce=b"challenge", **kw)
    with pytest.raises(ReportDataError):
        verify_quote(quote, expected_key_spki=spki, nonce=b"other", **kw)
    stranger = spki_der_of(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ReportDataError):
        verify_quote(quote, expected_key_spki=stranger, nonce=b"challenge", **kw)
    with pytest.raises(ConfigError):
        fresh_evidence(provider, spki, b"")


def test_quote_moved_to_another_key_is_rejected(pki: DevPKI, provider: SimulatedProvider) -> None:
    creds = make_ratls_certificate(provider, now=DEV_NOW)
    with pytest.raises(ReportDataError):
        _verify(pki, _self_signed([(RATLS_QUOTE_OID, creds.quote)]))


def test_dice_evidence_moved_to_another_key_is_rejected(provider: SimulatedProvider) -> None:
    creds = make_ratls_certificate(provider, now=DEV_NOW, encoding="dice")
    value = x509.load_der_x509_certificate(creds.cert_der).extensions.get_extension_for_oid(
        DICE_EVIDENCE_OID
    )
    assert isinstance(value.value, x509.UnrecognizedExtension)
    with pytest.raises(ReportDataError):
        extract_evidence(_self_signed([(DICE_EVIDENCE_OID, value.value.value)]))


def test_dice_claims_not_bound_by_quote(provider: SimulatedProvider) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    entry = cbor2.dumps([1, hashlib.sha256(spki_der_of(key)).digest()])
    claims = cbor2.dumps({"pubkey-hash": entry})
    quote = provider.quote(bytes(64))  # report data does not hash the claims
    evidence = cbor2.dumps(cbor2.CBORTag(60000, [quote, claims]))
    with pytest.raises(ReportDataError):
        extract_evidence(_self_signed([(DICE_EVIDENCE_OID, evidence)], key=key))


def test_certificate_checks(pki: DevPKI, provider: SimulatedProvider) -> None:
    creds = make_ratls_certificate(provider, now=DEV_NOW, validity_days=1)
    with pytest.raises(EvidenceSignatureError, match="not valid at"):
        _verify(pki, creds.cert_der, now=DEV_NOW + 2 * 86400)
    with pytest.raises(EvidenceSignatureError, match="not valid at"):
        _verify(pki, creds.cert_der, now=DEV_NOW - 3600)
    other = ec.generate_private_key(ec.SECP256R1())
    forged = _self_signed([(RATLS_QUOTE_OID, creds.quote)], key=creds.key, signer=other)
    with pytest.raises(EvidenceSignatureError, match="self-signed"):
        _verify(pki, forged)
    tampered = bytearray(creds.cert_der)
    tampered[-5] ^= 0x01  # inside the signature
    with pytest.raises((EvidenceSignatureError, EvidenceFormatError)):
        _verify(pki, bytes(tampered))


def test_certificate_argument_errors(provider: SimulatedProvider) -> None:
    with pytest.raises(ConfigError):
        make_ratls_certificate(provider, now=DEV_NOW, curve="P-521")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        make_ratls_certificate(provider, now=DEV_NOW, key=ec.generate_private_key(ec.SECP521R1()))
    with pytest.raises(ConfigError):
        make_ratls_certificate(provider, now=DEV_NOW, validity_days=0)
    with pytest.raises(ConfigError):
        make_ratls_certificate(provider, now=DEV_NOW, encoding="cbor")  # type: ignore[arg-type]


def test_no_evidence_extension() -> None:
    with pytest.raises(EvidenceFormatError, match="no RA-TLS evidence"):
        extract_evidence(_self_signed([]))


def test_rsa_key_unsupported(provider: SimulatedProvider) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(UnsupportedEvidenceError):
        extract_evidence(_self_signed([(RATLS_QUOTE_OID, provider.quote(bytes(64)))], key=key))


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x00" * 100, b"\x30\x82" + b"\xff" * 40000])
def test_garbage_certificates(data: bytes) -> None:
    with pytest.raises(EvidenceFormatError):
        extract_evidence(data)


def _dice(value: Any) -> bytes:
    return cbor2.dumps(value)


QUOTE_LIKE = b"\x03\x00" + bytes(500)
BAD_DICE = {
    "not-cbor": b"\xff\xff",
    "truncated": _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, b"x"]))[:-3],
    "trailing": _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, b"x"])) + b"\x00",
    "untagged": _dice([QUOTE_LIKE, b"x"]),
    "wrong-tag": _dice(cbor2.CBORTag(60001, [QUOTE_LIKE, b"x"])),
    "three-items": _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, b"x", b"y"])),
    "quote-not-bytes": _dice(cbor2.CBORTag(60000, ["quote", b"x"])),
    "quote-too-small": _dice(cbor2.CBORTag(60000, [b"q", _dice({"pubkey-hash": b"x"})])),
    "quote-too-big": _dice(cbor2.CBORTag(60000, [bytes(20000), b"x"])),
    "claims-not-map": _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, _dice([1, 2])])),
    "claims-empty": _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, _dice({})])),
    "claims-int-key": _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, _dice({1: b"x"})])),
    "no-pubkey-hash": _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, _dice({"nonce": b"x"})])),
    "hash-entry-garbage": _dice(
        cbor2.CBORTag(60000, [QUOTE_LIKE, _dice({"pubkey-hash": b"\xff"})])
    ),
    "hash-entry-shape": _dice(
        cbor2.CBORTag(60000, [QUOTE_LIKE, _dice({"pubkey-hash": _dice(["sha256", b"x"])})])
    ),
    "deep-nesting": b"\x81" * 5000 + b"\x00",
}


@pytest.mark.parametrize("name", sorted(BAD_DICE))
def test_malformed_dice_evidence(name: str) -> None:
    with pytest.raises(EvidenceFormatError):
        extract_evidence(_self_signed([(DICE_EVIDENCE_OID, BAD_DICE[name])]))


def test_unknown_dice_hash_algorithm() -> None:
    claims = _dice({"pubkey-hash": _dice([99, bytes(32)])})
    evidence = _dice(cbor2.CBORTag(60000, [QUOTE_LIKE, claims]))
    with pytest.raises(UnsupportedEvidenceError):
        extract_evidence(_self_signed([(DICE_EVIDENCE_OID, evidence)]))


@settings(max_examples=60)
@given(value=st.binary(max_size=600))
def test_any_dice_value_is_refused_cleanly(value: bytes) -> None:
    with pytest.raises(AttestationError):
        extract_evidence(_self_signed([(DICE_EVIDENCE_OID, value)]))


@settings(max_examples=60)
@given(value=st.binary(min_size=1, max_size=5000))
def test_any_quote_value_is_refused_cleanly(pki: DevPKI, value: bytes) -> None:
    with pytest.raises(AttestationError):
        _verify(pki, _self_signed([(RATLS_QUOTE_OID, value)]))


@settings(max_examples=100)
@given(data=st.binary(max_size=3000))
def test_any_bytes_as_certificate(data: bytes) -> None:
    with pytest.raises(AttestationError):
        extract_evidence(data)
