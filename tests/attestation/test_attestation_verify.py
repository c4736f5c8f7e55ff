"""verify_quote on the real path: dcap-qvl with Intel-signed vectors and the dev PKI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from secure_ci.attestation import (
    INTEL_ROOT_FINGERPRINT,
    Collateral,
    DevPKI,
    MrSignerRule,
    Policy,
    TdReportBody,
    parse_quote,
    verify_quote,
)
from secure_ci.attestation._errors import translate_qvl_error
from secure_ci.attestation._quote import MAX_QUOTE_PADDING
from secure_ci.exceptions import (
    AttributesError,
    CollateralError,
    DebugEnclaveError,
    EvidenceFormatError,
    EvidenceSignatureError,
    MeasurementError,
    ReportDataError,
    RevokedError,
    TcbStatusError,
    UnsupportedEvidenceError,
)

SGX = "sgx-v3-dcapqvl-sample.bin"
TDX = "tdx-v4-dcapqvl-sample.bin"
MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
MRSIGNER = bytes.fromhex("815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
SGX_STATUS = frozenset({"ConfigurationAndSWHardeningNeeded"})
SGX_ADVISORIES = frozenset({"INTEL-SA-00289", "INTEL-SA-00615"})
DEV_MRENCLAVE = bytes(range(32))
DEV_MRSIGNER = bytes(range(32, 64))


def _sgx_policy(**changes: Any) -> Policy:
    kwargs: dict[str, Any] = {
        "mrenclave": frozenset({MRENCLAVE}),
        "tcb_status": SGX_STATUS,
        "advisories": SGX_ADVISORIES,
    }
    kwargs.update(changes)
    return Policy(**kwargs)


def _dev_policy(pki: DevPKI, **changes: Any) -> Policy:
    kwargs: dict[str, Any] = {"roots": (pki.root_der,), "mrenclave": frozenset({DEV_MRENCLAVE})}
    kwargs.update(changes)
    return Policy(**kwargs)


def _spki() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _td_body(raw: bytes) -> TdReportBody:
    body = parse_quote(raw).body
    if not isinstance(body, TdReportBody):
        raise TypeError("not a TDX quote")
    return body


def test_real_sgx_quote_accepted(
    vector: Callable[[str], bytes], sgx_collateral: Collateral, in_window: int
) -> None:
    raw = vector(SGX)
    policy = _sgx_policy()
    enclave = verify_quote(raw, collateral=sgx_collateral, policy=policy, now=in_window)
    assert enclave.tee == "sgx"
    assert enclave.mrenclave == MRENCLAVE
    assert enclave.mrsigner == MRSIGNER
    assert enclave.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert enclave.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert enclave.quote_id == hashlib.sha256(raw[:432]).hexdigest()
    assert enclave.root_fingerprint == INTEL_ROOT_FINGERPRINT
    leaf = parse_quote(raw).pck_leaf_der()
    assert enclave.pck_leaf_fingerprint == hashlib.sha256(leaf).hexdigest()
    assert enclave.collateral_digest == sgx_collateral.digest
    assert enclave.policy_digest == policy.digest
    assert enclave.verified_at == in_window
    assert json.loads(json.dumps(enclave.to_dict()))["mrenclave"] == MRENCLAVE.hex()


def test_quote_id_ignores_zero_padding_and_nonzero_trailer_is_refused(
    vector: Callable[[str], bytes], sgx_collateral: Collateral, in_window: int
) -> None:
    raw, policy = vector(SGX), _sgx_policy()
    padded = verify_quote(raw + bytes(16), collateral=sgx_collateral, policy=policy, now=in_window)
    plain = verify_quote(raw, collateral=sgx_collateral, policy=policy, now=in_window)
    assert padded == plain
    for trailer in (b"\1", bytes(15) + b"\xff", bytes(MAX_QUOTE_PADDING + 1)):
        with pytest.raises(EvidenceFormatError, match="after the signature data"):
            verify_quote(raw + trailer, collateral=sgx_collateral, policy=policy, now=in_window)


@pytest.mark.parametrize(
    ("rule", "accepted"),
    [
        (MrSignerRule(MRSIGNER, 0, 0), True),
        (MrSignerRule(MRSIGNER, 0, 1), False),
        (MrSignerRule(MRSIGNER, 1, 0), False),
        (MrSignerRule(bytes(32), 0, 0), False),
    ],
)
def test_mrsigner_rules(
    vector: Callable[[str], bytes],
    sgx_collateral: Collateral,
    in_window: int,
    rule: MrSignerRule,
    accepted: bool,
) -> None:
    policy = _sgx_policy(mrenclave=frozenset(), mrsigner=(rule,))
    if accepted:
        enclave = verify_quote(vector(SGX), collateral=sgx_collateral, policy=policy, now=in_window)
        assert enclave.mrsigner == MRSIGNER
    else:
        with pytest.raises(MeasurementError):
            verify_quote(vector(SGX), collateral=sgx_collateral, policy=policy, now=in_window)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"tcb_status": frozenset({"UpToDate"})}, TcbStatusError),
        ({"advisories": frozenset({"INTEL-SA-00289"})}, TcbStatusError),
        ({"advisories": frozenset()}, TcbStatusError),
        ({"mrenclave": frozenset({bytes(32)})}, MeasurementError),
        ({"require_nonce": True}, ReportDataError),
    ],
)
def test_policy_rejections_on_real_sgx(
    vector: Callable[[str], bytes],
    sgx_collateral: Collateral,
    in_window: int,
    changes: dict[str, Any],
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        verify_quote(
            vector(SGX), collateral=sgx_collateral, policy=_sgx_policy(**changes), now=in_window
        )


def test_wildcard_advisories(
    vector: Callable[[str], bytes], sgx_collateral: Collateral, in_window: int
) -> None:
    policy = _sgx_policy(advisories=frozenset({"*"}))
    enclave = verify_quote(vector(SGX), collateral=sgx_collateral, policy=policy, now=in_window)
    assert enclave.advisory_ids


def test_collateral_age_and_window(
    vector: Callable[[str], bytes], sgx_collateral: Collateral
) -> None:
    raw, issued, day = vector(SGX), sgx_collateral.issue_date, 86_400
    young = _sgx_policy(max_collateral_age_days=1)
    verify_quote(raw, collateral=sgx_collateral, policy=young, now=issued + day // 2)
    with pytest.raises(CollateralError, match="older than 1 days"):
        verify_quote(raw, collateral=sgx_collateral, policy=young, now=issued + 2 * day)
    for now in (issued - day, sgx_collateral.next_update + day):
        with pytest.raises(CollateralError):
            verify_quote(raw, collateral=sgx_collateral, policy=_sgx_policy(), now=now)


def test_real_tdx_v4_accepted_and_rtmrs(
    vector: Callable[[str], bytes], tdx_collateral: Collateral, in_window: int
) -> None:
    raw = vector(TDX)
    assert raw[-70:] == bytes(70)  # the genuine quote carries zero padding: accepted
    body = _td_body(raw)
    pinned = tuple(frozenset({r}) for r in body.rtmrs)
    policy = Policy(mrtd=frozenset({body.mrtd}), rtmrs=pinned)
    enclave = verify_quote(raw, collateral=tdx_collateral, policy=policy, now=in_window)
    assert enclave.tee == "tdx"
    assert enclave.tcb_status == "UpToDate"
    assert enclave.mrtd == body.mrtd
    assert enclave.rtmrs == body.rtmrs
    assert enclave.quote_id == hashlib.sha256(raw[:632]).hexdigest()
    assert verify_quote(raw[:-70], collateral=tdx_collateral, policy=policy, now=in_window) == (
        enclave
    )
    explicit_any = Policy(mrtd=frozenset({body.mrtd}), rtmr_any=True)
    accepted = verify_quote(raw, collateral=tdx_collateral, policy=explicit_any, now=in_window)
    assert accepted.rtmrs == body.rtmrs
    assert accepted.policy_digest != enclave.policy_digest
    for i in range(4):
        wrong = Policy(
            mrtd=frozenset({body.mrtd}),
            rtmrs=tuple(frozenset({b"\1" * 48 if j == i else r}) for j, r in enumerate(body.rtmrs)),
        )
        with pytest.raises(MeasurementError, match=f"RTMR{i}"):
            verify_quote(raw, collateral=tdx_collateral, policy=wrong, now=in_window)
    with pytest.raises(MeasurementError, match="MRTD"):
        verify_quote(raw, collateral=tdx_collateral, policy=Policy(), now=in_window)
    with pytest.raises(EvidenceFormatError, match="non-zero byte 0x01 at offset 5005"):
        verify_quote(raw[:-1] + b"\1", policy=policy, collateral=tdx_collateral, now=in_window)


def test_tdx_v5_reaches_dcap_qvl(
    vector: Callable[[str], bytes], tdx_collateral: Collateral, in_window: int
) -> None:
    # dcap-qvl 0.7.0 parses v5 (TD report 1.5); no collateral for its platform exists here,
    # and its PCK leaf is not valid yet in June 2025.
    raw = vector("tdx-v5-gotdxguest-sample.bin")
    policy = Policy(mrtd=frozenset({_td_body(raw).mrtd}), rtmr_any=True)
    with pytest.raises(CollateralError, match="CertNotValidYet"):
        verify_quote(raw, collateral=tdx_collateral, policy=policy, now=in_window)


def test_dev_quote_key_and_nonce_binding(dev_pki: DevPKI, in_window: int) -> None:
    spki, nonce = _spki(), b"fresh nonce"
    report_data = hashlib.sha256(spki).digest() + hashlib.sha256(nonce).digest()
    raw = dev_pki.quote(report_data=report_data, mrenclave=DEV_MRENCLAVE, mrsigner=DEV_MRSIGNER)
    policy = _dev_policy(dev_pki, require_nonce=True)

    def verify(key: bytes, nonce: bytes | None) -> object:
        return verify_quote(
            raw,
            collateral=dev_pki.collateral,
            policy=policy,
            now=in_window,
            expected_key_spki=key,
            nonce=nonce,
        )

    enclave = verify(spki, nonce)
    assert enclave.report_data == report_data  # type: ignore[attr-defined]
    with pytest.raises(ReportDataError, match="expected key"):
        verify(_spki(), nonce)
    with pytest.raises(ReportDataError, match="nonce"):
        verify(spki, b"old nonce")
    with pytest.raises(ReportDataError, match="requires a nonce"):
        verify(spki, None)


def test_root_selection(
    dev_pki: DevPKI, vector: Callable[[str], bytes], sgx_collateral: Collateral, in_window: int
) -> None:
    both = (dev_pki.root_der, Policy().roots[0])
    real = verify_quote(
        vector(SGX), collateral=sgx_collateral, policy=_sgx_policy(roots=both), now=in_window
    )
    assert real.root_fingerprint == INTEL_ROOT_FINGERPRINT
    raw = dev_pki.quote(mrenclave=DEV_MRENCLAVE, mrsigner=DEV_MRSIGNER)
    dev_policy = _dev_policy(dev_pki, roots=both[::-1])
    dev = verify_quote(raw, collateral=dev_pki.collateral, policy=dev_policy, now=in_window)
    assert dev.root_fingerprint == hashlib.sha256(dev_pki.root_der).hexdigest()
    intel_only = Policy(mrenclave=frozenset({DEV_MRENCLAVE}))
    with pytest.raises(EvidenceSignatureError):
        verify_quote(raw, collateral=dev_pki.collateral, policy=intel_only, now=in_window)


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (0x05, None),
        (0x01, AttributesError),
        (0x04, AttributesError),
        (0x15, AttributesError),
        (0x07, DebugEnclaveError),
    ],
)
def test_sgx_attribute_rules(
    dev_pki: DevPKI, in_window: int, flags: int, error: type[Exception] | None
) -> None:
    attributes = bytes([flags]) + bytes(7) + bytes.fromhex("e700000000000000")
    raw = dev_pki.quote(mrenclave=DEV_MRENCLAVE, mrsigner=DEV_MRSIGNER, attributes=attributes)
    policy = _dev_policy(dev_pki)
    if error is None:
        enclave = verify_quote(raw, collateral=dev_pki.collateral, policy=policy, now=in_window)
        assert enclave.attributes == attributes
    else:
        with pytest.raises(error):
            verify_quote(raw, collateral=dev_pki.collateral, policy=policy, now=in_window)


def test_allow_debug_still_refused_by_dcap_qvl(dev_pki: DevPKI, in_window: int) -> None:
    # dcap-qvl 0.7.0 has no switch for debug enclaves: allow_debug cannot loosen it.
    raw = dev_pki.quote(mrenclave=DEV_MRENCLAVE, mrsigner=DEV_MRSIGNER, debug=True)
    policy = _dev_policy(dev_pki, allow_debug=True)
    with pytest.raises(DebugEnclaveError):
        verify_quote(raw, collateral=dev_pki.collateral, policy=policy, now=in_window)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("Failed to verify certificate chain\n\nCaused by:\n    CertRevoked", RevokedError),
        ("TCB status is invalid: Revoked", RevokedError),
        ("Debug mode is enabled", DebugEnclaveError),
        ("CrlExpired { time: 1 }", CollateralError),
        ("TCBInfo issue date is in the future", CollateralError),
        ("Fmspc mismatch", CollateralError),
        ("No matching TCB level found", TcbStatusError),
        ("TCB status SWHardeningNeeded is not acceptable by policy", TcbStatusError),
        (
            "Failed to parse root CA CRL\n\nCaused by:\n InvalidCrlSignatureForPublicKey",
            EvidenceSignatureError,
        ),
        ("Failed to verify certificate chain / UnknownIssuer", EvidenceSignatureError),
        ("ISV enclave report signature is invalid", EvidenceSignatureError),
        ("Unsupported quote version 9", UnsupportedEvidenceError),
        ("Failed to decode quote", EvidenceFormatError),
        ("something new", EvidenceSignatureError),
    ],
)
def test_dcap_qvl_error_translation(message: str, error: type[Exception]) -> None:
    translated = translate_qvl_error(ValueError(f"Verification failed: {message}"))
    assert type(translated) is error
    assert "dcap-qvl" in str(translated)
