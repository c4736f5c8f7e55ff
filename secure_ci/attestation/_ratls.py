"""RA-TLS certificates: a self-signed X.509 certificate that carries the enclave's quote.

Two encodings are understood, both as produced by Gramine's ``ra_tls_attest.c``:

- *quote extension* (OID 1.2.840.113741.1337.6, non-critical): the extension value is the raw
  quote, whose ``report_data[0:32] = SHA-256(DER SubjectPublicKeyInfo)``. Gramine writes this
  OID with its DER tag and length inside the OID bytes, so its certificates actually carry
  ``0.6.9.42.840.113741.1337.6``; we read both and write the correct one (Gramine's own
  verifier finds either by a byte search).
- *TCG DICE tagged evidence* (OID 2.23.133.5.4.9, Gramine 1.8): CBOR tag 60000 wrapping
  ``[quote, claims]``, where ``claims`` is a serialized CBOR map holding ``"pubkey-hash"`` =
  serialized ``[IANA hash id, hash(SPKI)]`` and ``report_data[0:32] = SHA-256(claims)``.

Optionally ``report_data[32:64] = SHA-256(nonce)`` binds a verifier's nonce (freshness).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secure_ci.attestation._collateral import Collateral
from secure_ci.attestation._policy import Policy
from secure_ci.attestation._providers import EvidenceProvider
from secure_ci.attestation._quote import parse_quote
from secure_ci.attestation._verify import VerifiedEnclave, verify_quote
from secure_ci.exceptions import (
    ConfigError,
    EvidenceFormatError,
    EvidenceSignatureError,
    ReportDataError,
    UnsupportedEvidenceError,
)

__all__ = [
    "DICE_EVIDENCE_OID",
    "GRAMINE_LEGACY_QUOTE_OID",
    "RATLS_QUOTE_OID",
    "ExtractedEvidence",
    "RatlsCredentials",
    "extract_evidence",
    "fresh_evidence",
    "make_ratls_certificate",
    "ratls_report_data",
    "spki_der_of",
    "verify_ratls_certificate",
]

RATLS_QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
GRAMINE_LEGACY_QUOTE_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
DICE_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
DICE_QUOTE_TAG = 60000
MAX_CERT_BYTES = 32 * 1024
MAX_EVIDENCE_QUOTE_BYTES = 16 * 1024
MIN_QUOTE_BYTES = 128
_IANA_HASHES: dict[int, str] = {1: "sha256", 7: "sha384", 8: "sha512"}
_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
_SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "secure-ci RA-TLS"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secure-ci enclave"),
    ]
)


@dataclass(frozen=True)
class RatlsCredentials:
    """An enclave's TLS key and the RA-TLS certificate that binds it to a quote."""

    cert_der: bytes
    cert_pem: str
    key_pem: str = field(repr=False)
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    quote: bytes = field(repr=False)


class ExtractedEvidence(NamedTuple):
    """The quote of an RA-TLS certificate and the certificate's SubjectPublicKeyInfo (DER)."""

    quote: bytes
    spki_der: bytes
    encoding: Literal["quote", "dice"]


def spki_der_of(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    """DER SubjectPublicKeyInfo of a TLS key: what ``report_data[0:32]`` hashes."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ratls_report_data(bound: bytes, nonce: bytes | None = None) -> bytes:
    """``SHA-256(bound) || SHA-256(nonce)`` (zeros without a nonce): 64 bytes of report data."""
    tail = hashlib.sha256(nonce).digest() if nonce is not None else bytes(32)
    return hashlib.sha256(bound).digest() + tail


def fresh_evidence(provider: EvidenceProvider, spki_der: bytes, nonce: bytes) -> bytes:
    """A quote binding the TLS key and a verifier's nonce (``report_data[32:64]``)."""
    if not nonce:
        raise ConfigError("a freshness nonce must not be empty")
    return provider.quote(ratls_report_data(spki_der, nonce))


def _dice_claims(spki_der: bytes) -> bytes:
    hash_entry = cbor2.dumps([1, hashlib.sha256(spki_der).digest()], canonical=True)
    return cbor2.dumps({"pubkey-hash": hash_entry}, canonical=True)


def make_ratls_certificate(
    provider: EvidenceProvider,
    *,
    now: int,
    key: ec.EllipticCurvePrivateKey | None = None,
    curve: Literal["P-256", "P-384"] = "P-256",
    validity_days: int = 1,
    nonce: bytes | None = None,
    encoding: Literal["quote", "dice"] = "quote",
) -> RatlsCredentials:
    """Make (or take) a TLS key, get a quote binding it, and self-sign a certificate around it."""
    if key is None:
        if curve not in _CURVES:
            raise ConfigError(f"unsupported RA-TLS curve {curve!r} (P-256 or P-384)")
        key = ec.generate_private_key(_CURVES[curve])
    if key.curve.name not in ("secp256r1", "secp384r1"):
        raise ConfigError("RA-TLS keys must be P-256 or P-384")
    if not 1 <= validity_days <= 3650:
        raise ConfigError("validity_days must be between 1 and 3650")
    spki = spki_der_of(key)
    if encoding == "quote":
        quote = provider.quote(ratls_report_data(spki, nonce))
        oid, value = RATLS_QUOTE_OID, quote
    elif encoding == "dice":
        claims = _dice_claims(spki)
        quote = provider.quote(ratls_report_data(claims, nonce))
        oid = DICE_EVIDENCE_OID
        value = cbor2.dumps(cbor2.CBORTag(DICE_QUOTE_TAG, [quote, claims]), canonical=True)
    else:
        raise ConfigError(f"unknown RA-TLS evidence encoding {encoding!r}")
    start = dt.datetime.fromtimestamp(now, dt.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_SUBJECT)
        .issuer_name(_SUBJECT)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(minutes=5))
        .not_valid_after(start + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
        .sign(key, hashes.SHA384() if key.curve.name == "secp384r1" else hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return RatlsCredentials(
        cert_der=cert.public_bytes(serialization.Encoding.DER),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key_pem.decode(),
        key=key,
        quote=quote,
    )


def load_certificate(cert_der: bytes) -> x509.Certificate:
    """Parse a DER certificate, refusing oversized input with :class:`EvidenceFormatError`."""
    if not isinstance(cert_der, bytes | bytearray):
        raise EvidenceFormatError("an RA-TLS certificate must be bytes")
    if len(cert_der) > MAX_CERT_BYTES:
        raise EvidenceFormatError(f"certificate of {len(cert_der)} bytes exceeds {MAX_CERT_BYTES}")
    try:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
        _ = cert.extensions  # parse them now, so malformed ones fail here
    except (ValueError, TypeError, x509.DuplicateExtension) as exc:
        raise EvidenceFormatError(f"malformed RA-TLS certificate: {exc}") from exc
    return cert


def _decode_cbor(data: bytes, what: str) -> Any:
    """One CBOR item, no trailing bytes; any decoding failure is EvidenceFormatError."""
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise EvidenceFormatError(f"malformed CBOR in {what}: {exc}") from exc
    if fp.tell() != len(data):
        raise EvidenceFormatError(f"{len(data) - fp.tell()} trailing bytes after {what}")
    return value


def _check_quote_size(quote: object) -> bytes:
    if not isinstance(quote, bytes):
        raise EvidenceFormatError("RA-TLS evidence does not hold a quote byte string")
    if not MIN_QUOTE_BYTES <= len(quote) <= MAX_EVIDENCE_QUOTE_BYTES:
        raise EvidenceFormatError(f"RA-TLS quote of {len(quote)} bytes is out of bounds")
    return quote


def _dice_quote(value: bytes, spki_der: bytes) -> bytes:
    """Unwrap tag 60000 ``[quote, claims]`` and check the claims bind the certificate's key."""
    tagged = _decode_cbor(value, "DICE tagged evidence")
    if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != DICE_QUOTE_TAG:
        raise EvidenceFormatError(f"DICE evidence is not CBOR tag {DICE_QUOTE_TAG}")
    items = tagged.value
    if not isinstance(items, list | tuple) or len(items) != 2 or not isinstance(items[1], bytes):
        raise EvidenceFormatError("DICE evidence must be [quote, claims] byte strings")
    quote, claims = _check_quote_size(items[0]), items[1]
    claims_map = _decode_cbor(claims, "DICE claims")
    if not isinstance(claims_map, dict) or not claims_map:
        raise EvidenceFormatError("DICE claims must be a non-empty map")
    if not all(isinstance(k, str) and k for k in claims_map):
        raise EvidenceFormatError("DICE claim names must be non-empty text strings")
    entry_bytes = claims_map.get("pubkey-hash")
    if not isinstance(entry_bytes, bytes):
        raise EvidenceFormatError("DICE claims lack a 'pubkey-hash' byte string")
    entry = _decode_cbor(entry_bytes, "DICE pubkey-hash")
    if not (isinstance(entry, list | tuple) and len(entry) == 2 and type(entry[0]) is int):
        raise EvidenceFormatError("DICE pubkey-hash must be [hash id, hash]")
    algorithm = _IANA_HASHES.get(entry[0])
    if algorithm is None:
        raise UnsupportedEvidenceError(f"DICE pubkey-hash algorithm id {entry[0]} is unsupported")
    if not isinstance(entry[1], bytes) or entry[1] != hashlib.new(algorithm, spki_der).digest():
        raise ReportDataError("DICE pubkey-hash does not match the certificate's public key")
    if parse_quote(quote).report_data[:32] != hashlib.sha256(claims).digest():
        raise ReportDataError("quote report data does not bind the DICE claims")
    return quote


def extract_evidence(cert_der: bytes) -> ExtractedEvidence:
    """The quote and SPKI of an RA-TLS certificate (DICE evidence preferred, as Gramine does).

    For DICE evidence the key binding (claims hash in report data, key hash in claims) is
    checked here; for the quote extension the verifier checks ``report_data[0:32]``.
    """
    return _extract(load_certificate(cert_der))


def _extract(cert: x509.Certificate) -> ExtractedEvidence:
    spki = spki_der_of(_ec_key(cert))
    found = {ext.oid: ext.value for ext in cert.extensions}
    dice = found.get(DICE_EVIDENCE_OID)
    if dice is not None:
        return ExtractedEvidence(_dice_quote(_raw(dice), spki), spki, "dice")
    for oid in (RATLS_QUOTE_OID, GRAMINE_LEGACY_QUOTE_OID):
        if oid in found:
            return ExtractedEvidence(_check_quote_size(_raw(found[oid])), spki, "quote")
    raise EvidenceFormatError("certificate carries no RA-TLS evidence extension")


def _raw(value: x509.ExtensionType) -> bytes:
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceFormatError("RA-TLS evidence extension has an unexpected type")
    return value.value


def _ec_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EvidenceFormatError(f"RA-TLS certificate key is malformed: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
    ):
        raise UnsupportedEvidenceError("RA-TLS keys must be ECDSA P-256 or P-384")
    return key


def check_certificate(cert: x509.Certificate, now: int) -> None:
    """Self-signature and validity window; raises :class:`EvidenceSignatureError`."""
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise EvidenceSignatureError(
            f"RA-TLS certificate is not validly self-signed: {exc}"
        ) from exc
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    if not start <= now <= end:
        raise EvidenceSignatureError(
            f"RA-TLS certificate is not valid at {now} (valid {int(start)}..{int(end)})"
        )


def verify_ratls_certificate(
    cert_der: bytes,
    *,
    collateral: Collateral,
    policy: Policy,
    now: int,
    nonce: bytes | None = None,
) -> VerifiedEnclave:
    """Verify an RA-TLS certificate: signature, validity, evidence, key binding, policy."""
    cert = load_certificate(cert_der)
    evidence = _extract(cert)
    check_certificate(cert, now)
    return verify_quote(
        evidence.quote,
        collateral=collateral,
        policy=policy,
        now=now,
        expected_key_spki=evidence.spki_der if evidence.encoding == "quote" else None,
        nonce=nonce,
    )
