"""The dev PKI mints DCAP v3 quotes that go through the real dcap-qvl path, and only there."""

from __future__ import annotations

import json
from typing import Any

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.attestation import (
    Collateral,
    DevPKI,
    Policy,
    VerifiedEnclave,
    parse_quote,
    verify_quote,
)
from secure_ci.attestation._devpki import DEV_FMSPC
from secure_ci.exceptions import (
    AttestationError,
    CollateralError,
    ConfigError,
    DebugEnclaveError,
    EvidenceSignatureError,
    MeasurementError,
    RevokedError,
    TcbStatusError,
)
from secure_ci.testing import DEV_MRENCLAVE, DEV_MRSIGNER, DEV_NOW, dev_pki, dev_policy

DAY = 86400


@pytest.fixture(scope="module")
def pki() -> DevPKI:
    return dev_pki()


def _quote(pki: DevPKI, **kw: Any) -> bytes:
    kw.setdefault("mrenclave", DEV_MRENCLAVE)
    kw.setdefault("mrsigner", DEV_MRSIGNER)
    return pki.quote(**kw)


def _verify(pki: DevPKI, quote: bytes, *, now: int = DEV_NOW, **policy: Any) -> VerifiedEnclave:
    return verify_quote(quote, collateral=pki.collateral, policy=dev_policy(pki, **policy), now=now)


def test_dev_quote_accepted_by_dcap_qvl_directly(pki: DevPKI) -> None:
    collateral = dcap_qvl.QuoteCollateralV3.from_json(pki.collateral_json)
    report = dcap_qvl.verify_with_root_ca(_quote(pki), collateral, pki.root_der, DEV_NOW)
    assert report.status == "UpToDate"
    assert list(report.advisory_ids) == []


def test_dev_quote_verified_under_dev_policy(pki: DevPKI) -> None:
    data = bytes(range(64))
    enclave = _verify(pki, _quote(pki, report_data=data, isv_prod_id=7, isv_svn=3))
    assert enclave.mrenclave == DEV_MRENCLAVE
    assert enclave.mrsigner == DEV_MRSIGNER
    assert enclave.report_data == data
    assert (enclave.isv_prod_id, enclave.isv_svn) == (7, 3)
    assert enclave.tcb_status == "UpToDate"


def test_dev_quote_refused_under_intel_root(pki: DevPKI) -> None:
    with pytest.raises(EvidenceSignatureError):
        verify_quote(
            _quote(pki),
            collateral=pki.collateral,
            policy=Policy(mrenclave=frozenset({DEV_MRENCLAVE})),
            now=DEV_NOW,
        )


def test_dev_quote_refused_under_another_dev_root(pki: DevPKI) -> None:
    other = dev_pki()
    with pytest.raises(EvidenceSignatureError):
        verify_quote(_quote(pki), collateral=pki.collateral, policy=dev_policy(other), now=DEV_NOW)
    with pytest.raises(EvidenceSignatureError):  # their collateral, our quote
        verify_quote(
            _quote(pki), collateral=other.collateral, policy=dev_policy(other), now=DEV_NOW
        )


def test_root_with_intels_name_is_still_not_intel() -> None:
    """Roots are pinned by key: a dev root copying Intel's DN byte for byte gets nowhere."""
    impostor = dev_pki(intel_dn=True)
    intel = Policy(mrenclave=frozenset({DEV_MRENCLAVE}))
    root = x509.load_der_x509_certificate(impostor.root_der)
    assert root.subject.rfc4514_string().endswith("CN=Intel SGX Root CA")
    with pytest.raises(EvidenceSignatureError):
        verify_quote(_quote(impostor), collateral=impostor.collateral, policy=intel, now=DEV_NOW)
    _verify(impostor, _quote(impostor))  # trusted explicitly, it works: the key decides


def test_dev_quote_with_real_intel_collateral_is_refused(
    pki: DevPKI, sgx_collateral: Collateral, in_window: int
) -> None:
    intel = Policy(mrenclave=frozenset({DEV_MRENCLAVE}))
    at_sample = dev_pki(now=in_window)
    with pytest.raises(EvidenceSignatureError):
        verify_quote(_quote(at_sample), collateral=sgx_collateral, policy=intel, now=in_window)
    with pytest.raises(AttestationError):  # Intel's collateral, dev root trusted
        verify_quote(
            _quote(at_sample),
            collateral=sgx_collateral,
            policy=dev_policy(at_sample),
            now=in_window,
        )


def test_quote_layout(pki: DevPKI) -> None:
    quote = _quote(pki)
    parsed = parse_quote(quote)
    assert (parsed.version, parsed.tee, parsed.cert_data_type, parsed.trailing) == (3, "sgx", 5, 0)
    assert parsed.pck_leaf_der() == pki.leaf_der
    assert len(quote) < 4096


def test_pck_extension_as_dcap_qvl_reads_it(pki: DevPKI) -> None:
    leaf_pem = x509.load_der_x509_certificate(pki.leaf_der).public_bytes(Encoding.PEM)
    ext = dcap_qvl.parse_pck_extension_from_pem(leaf_pem)
    assert bytes(ext.fmspc) == DEV_FMSPC
    assert ext.pce_svn == 13
    assert len(bytes(ext.ppid)) == 16
    assert bytes(ext.pce_id) == bytes(2)
    assert ext.sgx_type == 0


def test_dev_names_say_not_intel(pki: DevPKI) -> None:
    root = x509.load_der_x509_certificate(pki.root_der)
    assert "NOT INTEL" in root.subject.rfc4514_string()
    assert pki.root_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert set(json.loads(pki.collateral_json)) == {
        "pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info",
        "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature",
    }  # fmt: skip


def test_debug_quote_rejected(pki: DevPKI) -> None:
    with pytest.raises(DebugEnclaveError):
        _verify(pki, _quote(pki, debug=True))


def test_wrong_measurement_rejected(pki: DevPKI) -> None:
    with pytest.raises(MeasurementError):
        _verify(pki, _quote(pki, mrenclave=bytes(32)))


@pytest.mark.parametrize("option", ["revoke_leaf", "revoke_pck_ca"])
def test_revocation(option: str) -> None:
    pki = dev_pki(**{option: True})
    with pytest.raises(RevokedError):
        _verify(pki, _quote(pki))


def test_tcb_status_and_advisories() -> None:
    pki = dev_pki(tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",))
    quote = _quote(pki)
    with pytest.raises(TcbStatusError):
        _verify(pki, quote)
    with pytest.raises(TcbStatusError):  # status allowed, advisory not
        _verify(pki, quote, tcb_status=frozenset({"UpToDate", "SWHardeningNeeded"}))
    enclave = _verify(
        pki,
        quote,
        tcb_status=frozenset({"SWHardeningNeeded"}),
        advisories=frozenset({"INTEL-SA-00615"}),
    )
    assert enclave.advisory_ids == ("INTEL-SA-00615",)


def test_revoked_tcb_level_rejected() -> None:
    pki = dev_pki(tcb_status="Revoked")
    with pytest.raises((RevokedError, TcbStatusError)):
        _verify(pki, _quote(pki), tcb_status=frozenset({"UpToDate", "OutOfDate"}))


@pytest.mark.parametrize(
    ("offset", "validity_days"),
    [(31 * DAY, 30), (2 * DAY, 1), (-2 * 3600, 30)],
    ids=["expired", "expired-short", "not-yet-valid"],
)
def test_collateral_window(offset: int, validity_days: int) -> None:
    pki = dev_pki(validity_days=validity_days)
    quote = _quote(pki)
    _verify(pki, quote)
    with pytest.raises(CollateralError):
        _verify(pki, quote, now=DEV_NOW + offset)


def test_seed_is_deterministic() -> None:
    a, b, c = dev_pki(seed=1), dev_pki(seed=1), dev_pki(seed=2)
    assert a.collateral_json == b.collateral_json
    assert a.root_der == b.root_der
    assert _quote(a) == _quote(b)
    assert a.root_der != c.root_der


def test_fresh_attestation_key_per_quote(pki: DevPKI) -> None:
    one, two = _quote(pki), _quote(pki)
    assert one[500:564] != two[500:564]  # attestation public key
    assert parse_quote(one).quote_id == parse_quote(two).quote_id  # same signed content


@pytest.mark.parametrize(
    "kwargs",
    [
        {"report_data": bytes(63)},
        {"mrenclave": bytes(31)},
        {"mrsigner": bytes(33)},
        {"attributes": bytes(15)},
        {"isv_svn": 1 << 16},
        {"isv_prod_id": -1},
    ],
)
def test_quote_argument_errors(pki: DevPKI, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _quote(pki, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"tcb_status": "Fine"}, {"validity_days": 0}, {"validity_days": 10_000}]
)
def test_generate_argument_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DevPKI.generate(DEV_NOW, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=40)
@given(
    report_data=st.binary(min_size=64, max_size=64),
    mrenclave=st.binary(min_size=32, max_size=32),
    prod=st.integers(0, 0xFFFF),
    svn=st.integers(0, 0xFFFF),
    attributes=st.binary(min_size=16, max_size=16),
)
def test_fields_round_trip_through_parser(
    pki: DevPKI, report_data: bytes, mrenclave: bytes, prod: int, svn: int, attributes: bytes
) -> None:
    quote = pki.quote(
        report_data=report_data,
        mrenclave=mrenclave,
        mrsigner=DEV_MRSIGNER,
        isv_prod_id=prod,
        isv_svn=svn,
        attributes=attributes,
    )
    body = parse_quote(quote).body
    assert body.report_data == report_data
    assert body.mrenclave == mrenclave  # type: ignore[union-attr]
    assert (body.isv_prod_id, body.isv_svn) == (prod, svn)  # type: ignore[union-attr]
    assert body.attributes == attributes  # type: ignore[union-attr]


@settings(max_examples=15)
@given(attributes=st.binary(min_size=16, max_size=16))
def test_any_attribute_choice_is_verified_or_rejected(pki: DevPKI, attributes: bytes) -> None:
    quote = _quote(pki, attributes=attributes)
    try:
        enclave = _verify(pki, quote)
    except AttestationError:
        return
    assert enclave.attributes == attributes
    assert attributes[0] & 0x05 == 0x05
    assert not attributes[0] & 0x02
