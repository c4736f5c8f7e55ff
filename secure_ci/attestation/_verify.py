"""``verify_quote``: the one way from quote bytes to a trusted :class:`VerifiedEnclave`.

Order: our strict parse (sizes, version, TEE type) -> dcap-qvl cryptography against each root
of the policy (never a root taken from the quote) -> our policy (debug, attributes,
measurement, TCB status and advisories, collateral age, report-data binding). Every failure
raises a specific :class:`AttestationError`; nothing returns False.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import dcap_qvl

from secure_ci.attestation._collateral import Collateral
from secure_ci.attestation._errors import is_qvl_failure, is_root_mismatch, translate_qvl_error
from secure_ci.attestation._policy import Policy
from secure_ci.attestation._quote import Quote, SgxReportBody, TdReportBody, parse_quote
from secure_ci.exceptions import (
    AttributesError,
    CollateralError,
    DebugEnclaveError,
    EvidenceFormatError,
    EvidenceSignatureError,
    MeasurementError,
    ReportDataError,
    TcbStatusError,
)

__all__ = ["VerifiedEnclave", "verify_quote"]

_SGX_INIT, _SGX_DEBUG, _SGX_MODE64, _SGX_PROVISION_KEY = 0x01, 0x02, 0x04, 0x10
_DAY = 86_400


@dataclass(frozen=True)
class VerifiedEnclave:
    """An enclave whose quote verified under a policy: everything the ledger records."""

    tee: str
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    attributes: bytes
    mrtd: bytes
    rtmrs: tuple[bytes, ...]
    report_data: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...]
    quote_id: str
    pck_leaf_fingerprint: str
    root_fingerprint: str
    collateral_digest: str
    policy_digest: str
    verified_at: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (bytes as hex)."""
        return {
            "tee": self.tee,
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "attributes": self.attributes.hex(),
            "mrtd": self.mrtd.hex(),
            "rtmrs": [r.hex() for r in self.rtmrs],
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "quote_id": self.quote_id,
            "pck_leaf_fingerprint": self.pck_leaf_fingerprint,
            "root_fingerprint": self.root_fingerprint,
            "collateral_digest": self.collateral_digest,
            "policy_digest": self.policy_digest,
            "verified_at": self.verified_at,
        }


def _qvl_verify(raw: bytes, collateral: Collateral, policy: Policy, now: int) -> tuple[Any, bytes]:
    """Run dcap-qvl with each policy root; return (report, accepting root)."""
    errors: list[BaseException] = []
    for root in policy.roots:
        try:
            return dcap_qvl.verify_with_root_ca(raw, collateral.to_qvl(), root, now), root
        except BaseException as exc:
            if not is_qvl_failure(exc):
                raise
            errors.append(exc)
    # Prefer the error from a root the evidence does chain to: it says what really failed.
    meaningful = [e for e in errors if not is_root_mismatch(e)]
    cause = (meaningful or errors)[-1]
    raise translate_qvl_error(cause) from cause


def _check_sgx(body: SgxReportBody, policy: Policy) -> None:
    flags = body.attributes[0]
    if flags & _SGX_DEBUG and not policy.allow_debug:
        raise DebugEnclaveError("SGX enclave has the DEBUG attribute")
    if not flags & _SGX_INIT or not flags & _SGX_MODE64:
        raise AttributesError(f"SGX attributes {flags:#04x} lack INIT or MODE64BIT")
    if flags & _SGX_PROVISION_KEY:
        raise AttributesError("SGX enclave has the PROVISION_KEY attribute")
    if body.mrenclave in policy.mrenclave:
        return
    for rule in policy.mrsigner:
        if (
            hmac.compare_digest(rule.mrsigner, body.mrsigner)
            and rule.isv_prod_id == body.isv_prod_id
            and body.isv_svn >= rule.min_isv_svn
        ):
            return
    raise MeasurementError(
        f"MRENCLAVE {body.mrenclave.hex()} / MRSIGNER {body.mrsigner.hex()} "
        f"(prod {body.isv_prod_id}, svn {body.isv_svn}) is not in the policy's allow-list"
    )


def _check_tdx(body: TdReportBody, policy: Policy) -> None:
    if body.debug and not policy.allow_debug:
        raise DebugEnclaveError("TD has the DEBUG attribute")
    if body.mrtd not in policy.mrtd:
        raise MeasurementError(f"MRTD {body.mrtd.hex()} is not in the policy's allow-list")
    if policy.rtmr_any:
        return
    for i, (value, allowed) in enumerate(zip(body.rtmrs, policy.rtmrs, strict=True)):
        if value not in allowed:
            raise MeasurementError(f"RTMR{i} {value.hex()} is not in the policy's allow-list")


def check_enclave(quote: Quote, policy: Policy) -> None:
    """Policy checks on the report body: debug, attributes, measurement allow-list."""
    if isinstance(quote.body, SgxReportBody):
        _check_sgx(quote.body, policy)
    else:
        _check_tdx(quote.body, policy)


def _check_chain(quote: Quote, root: bytes) -> bytes:
    """The PCK chain must be leaf, CA and optionally a copy of the anchor; returns the leaf.

    dcap-qvl ignores a root copy in the chain (the anchor is ours), so a different copy would
    be an unverified, malleable part of the quote; we refuse it.
    """
    chain = quote.pck_chain_der()
    if len(chain) not in (2, 3):
        raise EvidenceFormatError(f"PCK chain has {len(chain)} certificates (need 2 or 3)")
    if len(chain) == 3 and chain[2] != root:
        raise EvidenceSignatureError("the quote's root certificate is not the trusted anchor")
    return chain[0]


def _check_tcb(status: str, advisories: tuple[str, ...], policy: Policy) -> None:
    if status not in policy.tcb_status:
        raise TcbStatusError(f"TCB status {status} is not accepted by the policy")
    if "*" in policy.advisories:
        return
    refused = sorted(set(advisories) - policy.advisories)
    if refused:
        raise TcbStatusError(f"advisories not accepted by the policy: {', '.join(refused)}")


def _check_binding(
    report_data: bytes, policy: Policy, expected_key_spki: bytes | None, nonce: bytes | None
) -> None:
    if expected_key_spki is not None:
        want = hashlib.sha256(expected_key_spki).digest()
        if not hmac.compare_digest(report_data[:32], want):
            raise ReportDataError("report_data[0:32] is not SHA-256 of the expected key")
    if nonce is None:
        if policy.require_nonce:
            raise ReportDataError("the policy requires a nonce, none was given")
        return
    if not hmac.compare_digest(report_data[32:64], hashlib.sha256(nonce).digest()):
        raise ReportDataError("report_data[32:64] is not SHA-256 of the nonce")


def _measurements(body: SgxReportBody | TdReportBody) -> dict[str, Any]:
    if isinstance(body, SgxReportBody):
        return {
            "mrenclave": body.mrenclave,
            "mrsigner": body.mrsigner,
            "isv_prod_id": body.isv_prod_id,
            "isv_svn": body.isv_svn,
            "attributes": body.attributes,
            "mrtd": b"",
            "rtmrs": (),
        }
    return {
        "mrenclave": b"",
        "mrsigner": b"",
        "isv_prod_id": 0,
        "isv_svn": 0,
        "attributes": body.td_attributes,
        "mrtd": body.mrtd,
        "rtmrs": body.rtmrs,
    }


def verify_quote(
    quote: bytes,
    *,
    collateral: Collateral,
    policy: Policy,
    now: int,
    expected_key_spki: bytes | None = None,
    nonce: bytes | None = None,
) -> VerifiedEnclave:
    """Verify ``quote`` against ``collateral`` under ``policy`` at time ``now`` (Unix seconds).

    ``expected_key_spki`` (DER SubjectPublicKeyInfo) must hash to ``report_data[0:32]`` and
    ``nonce`` to ``report_data[32:64]`` when given. Only zero padding (bounded) may follow the
    signature data; any other unsigned byte is refused.
    """
    parsed = parse_quote(quote)
    report, root = _qvl_verify(bytes(quote), collateral, policy, now)
    status, advisories = str(report.status), tuple(str(a) for a in report.advisory_ids)
    leaf = _check_chain(parsed, root)
    check_enclave(parsed, policy)
    _check_tcb(status, advisories, policy)
    if now - collateral.issue_date > policy.max_collateral_age_days * _DAY:
        raise CollateralError(
            f"collateral issued at {collateral.issue_date} is older than "
            f"{policy.max_collateral_age_days} days at {now}"
        )
    _check_binding(parsed.report_data, policy, expected_key_spki, nonce)
    return VerifiedEnclave(
        tee=parsed.tee,
        **_measurements(parsed.body),
        report_data=parsed.report_data,
        tcb_status=status,
        advisory_ids=advisories,
        quote_id=parsed.quote_id,
        pck_leaf_fingerprint=hashlib.sha256(leaf).hexdigest(),
        root_fingerprint=hashlib.sha256(root).hexdigest(),
        collateral_digest=collateral.digest,
        policy_digest=policy.digest,
        verified_at=now,
    )
