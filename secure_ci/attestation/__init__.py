"""Enclave evidence: parse and verify SGX/TDX quotes under a policy, with dcap-qvl.

Import cost: cryptography and dcap-qvl only (no torch, no web3).
"""

from __future__ import annotations

from secure_ci.attestation._collateral import (
    Collateral,
    CollateralSource,
    FileCollateral,
    PccsCollateral,
)
from secure_ci.attestation._devpki import DevPKI
from secure_ci.attestation._policy import (
    INTEL_ROOT_FINGERPRINT,
    MrSignerRule,
    Policy,
    intel_root_der,
)
from secure_ci.attestation._providers import (
    EvidenceProvider,
    GramineProvider,
    SimulatedProvider,
    open_provider,
)
from secure_ci.attestation._quote import Quote, SgxReportBody, TdReportBody, parse_quote
from secure_ci.attestation._ratls import (
    ExtractedEvidence,
    RatlsCredentials,
    extract_evidence,
    fresh_evidence,
    make_ratls_certificate,
    ratls_report_data,
    spki_der_of,
    verify_ratls_certificate,
)
from secure_ci.attestation._verify import VerifiedEnclave, verify_quote

__all__ = [
    "INTEL_ROOT_FINGERPRINT",
    "Collateral",
    "CollateralSource",
    "DevPKI",
    "EvidenceProvider",
    "ExtractedEvidence",
    "FileCollateral",
    "GramineProvider",
    "MrSignerRule",
    "PccsCollateral",
    "Policy",
    "Quote",
    "RatlsCredentials",
    "SgxReportBody",
    "SimulatedProvider",
    "TdReportBody",
    "VerifiedEnclave",
    "extract_evidence",
    "fresh_evidence",
    "intel_root_der",
    "make_ratls_certificate",
    "open_provider",
    "parse_quote",
    "ratls_report_data",
    "spki_der_of",
    "verify_quote",
    "verify_ratls_certificate",
]
