"""Translate dcap-qvl's error strings into our exception tree.

dcap-qvl raises ``ValueError("Verification failed: <context>\\n\\nCaused by: <cause>")``; the
patterns below come from probing it (see ``shared/notes/dcap-qvl-dev-pki.md``). The first
matching row wins, so more specific rows come first. Anything unknown is a signature failure:
the quote was not accepted, and nothing more specific can be said.
"""

from __future__ import annotations

from secure_ci.exceptions import (
    AttestationError,
    CollateralError,
    DebugEnclaveError,
    EvidenceFormatError,
    EvidenceSignatureError,
    RevokedError,
    TcbStatusError,
    UnsupportedEvidenceError,
)

__all__ = ["is_qvl_failure", "is_root_mismatch", "translate_qvl_error"]

_TABLE: tuple[tuple[tuple[str, ...], type[AttestationError]], ...] = (
    (("certrevoked", "revoked"), RevokedError),
    (("debug mode",), DebugEnclaveError),
    (
        (
            "crlexpired",
            "expired",
            "in the future",
            "notvalidyet",
            "not_before",
            "issue date",
            "next update",
            "unknownrevocationstatus",
            "fmspc mismatch",
            "unsupported qe identity",
        ),
        CollateralError,
    ),
    (
        (
            "tcb status",
            "no matching tcb level",
            "isvsvn",
            "not acceptable by policy",
        ),
        TcbStatusError,
    ),
    (
        (
            "signature",
            "unknownissuer",
            "certificate chain",
            "mismatch",
            "causedasendentity",
        ),
        EvidenceSignatureError,
    ),
    (("unsupported",), UnsupportedEvidenceError),
    (("decode", "parse", "invalid", "length", "not enough data"), EvidenceFormatError),
)

_ROOT_MISMATCH = ("invalidcrlsignatureforpublickey", "unknownissuer")


def _flat(message: str) -> str:
    return " ".join(message.split()).lower()


def translate_qvl_error(exc: BaseException) -> AttestationError:
    """Map one dcap-qvl exception to the most specific AttestationError subclass."""
    message = " ".join(str(exc).split())
    lowered = _flat(message)
    for needles, kind in _TABLE:
        if any(n in lowered for n in needles):
            return kind(f"dcap-qvl: {message}")
    return EvidenceSignatureError(f"dcap-qvl: {message}")


def is_root_mismatch(exc: BaseException) -> bool:
    """True when dcap-qvl refused because the evidence does not chain to the root tried."""
    return any(n in _flat(str(exc)) for n in _ROOT_MISMATCH)


def is_qvl_failure(exc: BaseException) -> bool:
    """True for errors dcap-qvl raises on bad input: exceptions, and Rust panics (pyo3's
    ``PanicException`` derives from BaseException); never KeyboardInterrupt and the like."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"
