"""The one exception tree of secure-ci.

Everything the library raises on purpose derives from :class:`SecureCIError`; foreign
exceptions (torch, ssl, web3, dcap-qvl, sqlite) are translated where they enter
(``raise LedgerError(...) from exc``). Verification raises, it never returns False.

::

    SecureCIError
    ├── ConfigError                  a configuration, policy file or argument is invalid
    ├── PartitionError               a model cannot be traced or split; bad cut; wrong input
    │   └── CodecError               feature bytes are malformed, truncated or oversized
    ├── PackageError                 a model package is malformed, tampered with or inconsistent
    ├── AttestationError             evidence is not acceptable (never "maybe")
    │   ├── EvidenceFormatError      quote / certificate / collateral cannot be parsed
    │   │   └── UnsupportedEvidenceError   well-formed, but a version/type we do not verify
    │   ├── EvidenceSignatureError   a signature or certificate chain does not verify
    │   ├── RevokedError             a certificate in the chain is revoked
    │   ├── CollateralError          collateral expired, not yet valid, too old, missing
    │   ├── TcbStatusError           TCB status or advisory not accepted by the policy
    │   ├── DebugEnclaveError        the enclave runs in debug mode
    │   ├── AttributesError          enclave attributes not allowed by the policy
    │   ├── MeasurementError         measurement not in the policy's allow-list
    │   └── ReportDataError          report data not bound to the expected key / nonce
    ├── ProtocolError                the wire protocol was violated (carries code + reason)
    │   ├── LocalProtocolError       we tried to send something the state machine forbids
    │   └── RemoteProtocolError      the peer sent something invalid, or an error frame
    ├── ChannelError                 transport failed: connect, TLS, peer closed, timeout
    │   └── DeadlineExceeded         an operation did not finish before its deadline
    ├── AuthorizationError           a peer is authenticated but not allowed to do this
    ├── SignatureError               a record / receipt signature does not verify
    ├── DisagreementError            edges that ran one task returned no majority result
    └── LedgerError                  the ledger or the journal failed
        ├── ChainError               the chain backend (RPC, in-process EVM) failed
        ├── ContractRevertError      a contract call reverted (carries the reason)
        ├── JournalError             the write-ahead journal is unusable or inconsistent
        ├── RecordError              a ledger record is malformed
        └── ProofError               an inclusion proof does not verify

Errors that cross the wire are data: :class:`ProtocolError` carries a numeric ``code`` and a
``reason`` so the edge can answer with an error frame and the device can raise the same type.
``remote`` tells local from remote blame.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "AttributesError",
    "AuthorizationError",
    "ChainError",
    "ChannelError",
    "CodecError",
    "CollateralError",
    "ConfigError",
    "ContractRevertError",
    "DeadlineExceeded",
    "DebugEnclaveError",
    "DisagreementError",
    "EvidenceFormatError",
    "EvidenceSignatureError",
    "JournalError",
    "LedgerError",
    "LocalProtocolError",
    "MeasurementError",
    "PackageError",
    "PartitionError",
    "ProofError",
    "ProtocolError",
    "RecordError",
    "RemoteProtocolError",
    "ReportDataError",
    "RevokedError",
    "SecureCIError",
    "SignatureError",
    "TcbStatusError",
    "UnsupportedEvidenceError",
]


class SecureCIError(Exception):
    """Root of every error secure-ci raises on purpose."""


class ConfigError(SecureCIError):
    """A configuration value, policy file or command-line argument is invalid."""


class PartitionError(SecureCIError):
    """A model cannot be analysed or split, a cut does not exist, or an input is wrong."""


class CodecError(PartitionError):
    """Encoded feature bytes are malformed, truncated, oversized or inconsistent."""


class PackageError(SecureCIError):
    """A model package was refused: malformed, oversized, tampered with (its digest, its
    weights' digest or its ``model_id`` does not match), or inconsistent with its model."""


class AttestationError(SecureCIError):
    """Evidence was not accepted. The message says which check failed."""


class EvidenceFormatError(AttestationError):
    """A quote, certificate extension or collateral bundle cannot be parsed."""


class UnsupportedEvidenceError(EvidenceFormatError):
    """Well-formed evidence of a version or type that is not supported."""


class EvidenceSignatureError(AttestationError):
    """A quote signature, QE report or certificate chain does not verify."""


class RevokedError(AttestationError):
    """A certificate of the evidence chain (or the TCB) is revoked."""


class CollateralError(AttestationError):
    """Collateral is expired, not yet valid, older than the policy allows, or missing."""


class TcbStatusError(AttestationError):
    """The platform's TCB status or one of its advisories is not accepted."""


class DebugEnclaveError(AttestationError):
    """The enclave runs in debug mode and the policy does not allow it."""


class AttributesError(AttestationError):
    """The enclave's attributes are not allowed by the policy."""


class MeasurementError(AttestationError):
    """The enclave measurement is not in the policy's allow-list."""


class ReportDataError(AttestationError):
    """The quote's report data does not bind the expected key or nonce."""


class ProtocolError(SecureCIError):
    """The wire protocol was violated.

    ``code`` is the numeric error code that travels in an error frame, ``reason`` a short
    human-readable explanation, ``remote`` is True when the peer is to blame.
    """

    def __init__(self, reason: str, *, code: int = 1, remote: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.remote = remote


class LocalProtocolError(ProtocolError):
    """We attempted something the protocol state machine does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent invalid data, or answered with an error frame."""

    def __init__(self, reason: str, *, code: int = 1) -> None:
        super().__init__(reason, code=code, remote=True)


class ChannelError(SecureCIError):
    """The transport failed: connection refused, TLS failure, peer closed."""


class DeadlineExceeded(ChannelError):
    """An operation did not complete before its deadline."""


class AuthorizationError(SecureCIError):
    """The peer is authenticated but not allowed to do what it asked."""


class SignatureError(SecureCIError):
    """A signature over a record or receipt does not verify."""


class DisagreementError(SecureCIError):
    """Edges that ran the same task returned results without a strict majority.

    ``receipts`` holds each edge's signed task receipt (the evidence for a dispute).
    """

    def __init__(self, message: str, receipts: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.receipts = receipts


class LedgerError(SecureCIError):
    """The ledger or the local journal failed."""


class ChainError(LedgerError):
    """The chain backend (JSON-RPC node or in-process EVM) failed or is unreachable."""


class ContractRevertError(LedgerError):
    """A contract call reverted; ``reason`` is the decoded revert reason or error name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JournalError(LedgerError):
    """The write-ahead journal is unusable or inconsistent."""


class RecordError(LedgerError):
    """A ledger record is malformed or fails its canonical encoding."""


class ProofError(LedgerError):
    """A Merkle inclusion proof does not verify against the anchored root."""
