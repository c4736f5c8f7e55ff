"""Every vector in tests/vectors/attestation behaves as EXPECTED.json says.

Fields are cross-checked three ways: EXPECTED.json (written from an independent parse with
``cryptography``), our parser, and dcap-qvl's own parser. Zero padding after the signature
data (three TDX vectors) is accepted; the one vector with non-zero bytes there (go-tdx-guest's
"extra bytes(only for testing purpose)") is refused, and its fields are read with them cut off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_ci.attestation import (
    Collateral,
    Policy,
    SgxReportBody,
    TdReportBody,
    parse_quote,
    verify_quote,
)
from secure_ci.attestation._verify import check_enclave
from secure_ci.exceptions import (
    AttestationError,
    CollateralError,
    DebugEnclaveError,
    EvidenceFormatError,
    EvidenceSignatureError,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "attestation"
QUOTES = sorted(
    p.name for p in VECTORS.iterdir() if p.suffix in (".bin", ".hex") and "SYNTHETIC" not in p.name
)
WITH_COLLATERAL = {
    "sgx-v3-dcapqvl-sample.bin": "sgx-v3-dcapqvl-sample.collateral.json",
    "tdx-v4-dcapqvl-sample.bin": "tdx-v4-dcapqvl-sample.collateral.json",
}
DEBUG = [n for n in QUOTES if "debug" in n or "solana" in n]
NONZERO_TRAILER = {"tdx-v4-gotdxguest-spr-e4.bin": b"\nextra bytes(only for testing purpose)\n"}


def _signed_part(name: str, raw: bytes) -> bytes:
    """The quote without the non-zero unsigned trailer, for vectors that carry one."""
    trailer = NONZERO_TRAILER.get(name)
    if trailer is None:
        return raw
    if not raw.endswith(trailer):
        raise AssertionError(f"{name} does not end with its trailer")
    return raw[: -len(trailer)]


def _collateral(name: str) -> Collateral:
    return Collateral.from_json((VECTORS / name).read_text())


def _allowing(raw: bytes, **changes: Any) -> Policy:
    """A policy that allows exactly this quote's measurements and any TCB status."""
    body = parse_quote(raw).body
    kwargs: dict[str, Any] = {
        "tcb_status": frozenset({"UpToDate", "ConfigurationAndSWHardeningNeeded"}),
        "advisories": frozenset({"*"}),
    }
    if isinstance(body, SgxReportBody):
        kwargs["mrenclave"] = frozenset({body.mrenclave})
    else:
        kwargs["mrtd"] = frozenset({body.mrtd})
        kwargs["rtmrs"] = tuple(frozenset({r}) for r in body.rtmrs)
    kwargs.update(changes)
    return Policy(**kwargs)


def test_every_vector_is_listed(expected: dict[str, Any]) -> None:
    listed = {k for k in expected if not k.startswith("_")}
    assert listed == set(QUOTES)
    for name in QUOTES:
        digest = hashlib.sha256((VECTORS / name).read_bytes()).hexdigest()
        assert digest == expected[name]["sha256_of_file"], name


@pytest.mark.parametrize("name", QUOTES)
def test_parser_agrees_with_expected(
    name: str, vector: Callable[[str], bytes], expected: dict[str, Any]
) -> None:
    e, raw = expected[name], vector(name)
    signed = _signed_part(name, raw)
    q = parse_quote(signed)
    assert len(raw) == e["decoded_size"]
    assert (q.version, q.att_key_type, q.tee_type) == (e["version"], 2, int(e["tee_type"], 16))
    assert q.sig_data_len == e["sig_data_len"]
    assert q.trailing + len(raw) - len(signed) == e["bytes_after_signature_data"]
    assert q.cert_data_type == e["cert_data_type"]
    assert q.report_data.hex() == e["report_data"]
    assert q.body.debug is e["debug"]
    body = q.body
    if isinstance(body, SgxReportBody):
        assert body.mrenclave.hex() == e["mrenclave"]
        assert body.mrsigner.hex() == e["mrsigner"]
        assert (body.isv_prod_id, body.isv_svn) == (e["isvprodid"], e["isvsvn"])
        assert body.attributes[0] == int(e["attributes_flags"], 16)
    else:
        assert isinstance(body, TdReportBody)
        assert body.mrtd.hex() == e["mrtd"]
        assert body.td_attributes.hex() == e["td_attributes"]
        assert body.tee_tcb_svn.hex() == e["tee_tcb_svn"]
    leaf = x509.load_der_x509_certificate(q.pck_leaf_der())
    assert leaf.not_valid_after_utc.date().isoformat() == e["pck_leaf_not_after"]


@pytest.mark.parametrize("name", QUOTES)
def test_parser_agrees_with_dcap_qvl(name: str, vector: Callable[[str], bytes]) -> None:
    raw = vector(name)
    theirs, ours = dcap_qvl.parse_quote(raw), parse_quote(_signed_part(name, raw))
    assert theirs.header.version == ours.version
    assert bool(theirs.is_sgx()) == (ours.tee == "sgx")
    assert bytes(theirs.report.report_data) == ours.report_data


@pytest.mark.parametrize("name", QUOTES)
def test_unsigned_trailer_is_zero_padding_or_refused(
    name: str, vector: Callable[[str], bytes], expected: dict[str, Any]
) -> None:
    raw = vector(name)
    if name not in NONZERO_TRAILER:
        assert parse_quote(raw).trailing == expected[name]["bytes_after_signature_data"]
        return
    offset = len(_signed_part(name, raw))
    with pytest.raises(
        EvidenceFormatError, match=f"non-zero byte 0x0a at offset {offset}, 0 bytes"
    ):
        parse_quote(raw)
    # zero padding in place of the text is accepted, and the quote id is unchanged
    padded = parse_quote(raw[:offset] + bytes(len(raw) - offset))
    assert padded.quote_id == parse_quote(raw[:offset]).quote_id


@pytest.mark.parametrize("name", sorted(WITH_COLLATERAL))
def test_samples_with_collateral_are_accepted(
    name: str, vector: Callable[[str], bytes], in_window: int
) -> None:
    raw, collateral = vector(name), _collateral(WITH_COLLATERAL[name])
    enclave = verify_quote(raw, collateral=collateral, policy=_allowing(raw), now=in_window)
    assert enclave.root_fingerprint == Policy().root_fingerprints()[0]
    # the same under a policy that only trusts the impostor root with Intel's name
    impostor = x509.load_pem_x509_certificate(
        (VECTORS / "SYNTHETIC-intel-qvl-test-root-ca.pem").read_bytes()
    )
    impostor_policy = _allowing(raw, roots=(impostor.public_bytes(Encoding.DER),))
    with pytest.raises(EvidenceSignatureError):
        verify_quote(raw, collateral=collateral, policy=impostor_policy, now=in_window)


@pytest.mark.parametrize("name", sorted(WITH_COLLATERAL))
@pytest.mark.parametrize("when", ["2025-06-01", "2025-08-01"])
def test_samples_outside_collateral_window(
    name: str, when: str, vector: Callable[[str], bytes]
) -> None:
    now = int(datetime.fromisoformat(when).replace(tzinfo=UTC).timestamp())
    raw, collateral = vector(name), _collateral(WITH_COLLATERAL[name])
    with pytest.raises(CollateralError):
        verify_quote(raw, collateral=collateral, policy=_allowing(raw), now=now)


def test_debug_sgx_with_collateral_is_refused(
    vector: Callable[[str], bytes], in_window: int
) -> None:
    # same FMSPC as the dcap-qvl sample, so its collateral applies: dcap-qvl reaches the debug check
    raw = vector("sgx-v3-automata-solana.bin")
    collateral = _collateral("sgx-v3-dcapqvl-sample.collateral.json")
    with pytest.raises(DebugEnclaveError):
        verify_quote(raw, collateral=collateral, policy=_allowing(raw), now=in_window)


@pytest.mark.parametrize("name", DEBUG)
def test_debug_vectors_fail_our_policy(name: str, vector: Callable[[str], bytes]) -> None:
    raw = vector(name)
    with pytest.raises(DebugEnclaveError):
        check_enclave(parse_quote(raw), _allowing(raw))


@pytest.mark.parametrize("name", [n for n in QUOTES if n not in WITH_COLLATERAL])
def test_quotes_without_their_collateral_are_refused(
    name: str, vector: Callable[[str], bytes], in_window: int
) -> None:
    raw = vector(name)
    collateral = _collateral(
        "sgx-v3-dcapqvl-sample.collateral.json"
        if name.startswith("sgx")
        else "tdx-v4-dcapqvl-sample.collateral.json"
    )
    policy = _allowing(_signed_part(name, raw))
    for quote in {raw, _signed_part(name, raw)}:
        with pytest.raises(AttestationError):
            verify_quote(quote, collateral=collateral, policy=policy, now=in_window)


def test_synthetic_impostor_quote_is_refused(
    vector: Callable[[str], bytes], in_window: int
) -> None:
    raw = vector("SYNTHETIC-tdx-v4-intel-qvl-sample-test-root.bin")
    collateral = _collateral("tdx-v4-dcapqvl-sample.collateral.json")
    with pytest.raises(EvidenceSignatureError):
        verify_quote(raw, collateral=collateral, policy=_allowing(raw), now=in_window)


def test_vendored_root_matches_vector() -> None:
    assert Policy().roots[0] == (VECTORS / "intel-sgx-root-ca.der").read_bytes()
    pem = x509.load_pem_x509_certificate((VECTORS / "intel-sgx-root-ca.pem").read_bytes())
    assert pem.public_bytes(Encoding.DER) == Policy().roots[0]
