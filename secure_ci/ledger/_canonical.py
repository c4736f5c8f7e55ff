"""The opened output commitment that makes a dispute objective.

The output commitment an enclave signs (``TaskResult.outputCommitment``)::

    canonicalDigest   = keccak256("secure-ci/canonical/v1" || inputSalt || canonicalBytes)
    payloadDigest     = keccak256(inputSalt || payload)
    outputCommitment  = keccak256(outSalt || canonicalDigest || payloadDigest)

``canonicalBytes`` is the output under the model's canonical rule
(:class:`secure_ci.partition.CanonicalRule`, stored in the model package), which honest
edges produce identically whatever their batch size. ``inputSalt`` is the device's request
salt (the same for every edge of a redundant task), so equal canonical outputs give equal
digests while the digest reveals nothing about the label to whoever lacks the salt. The
opening ``(outSalt, canonicalDigest, payloadDigest)`` is what a dispute reveals (never the
output itself); the contract checks it against the signed commitment and compares the
canonical digests.
"""

from __future__ import annotations

from dataclasses import dataclass

from secure_ci.exceptions import RecordError
from secure_ci.ledger._records import keccak256

__all__ = ["CANONICAL_TAG", "OutputOpening", "canonical_digest", "open_output", "payload_digest"]

CANONICAL_TAG = b"secure-ci/canonical/v1"


def _salt(value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise RecordError("salt must be 32 bytes")


def canonical_digest(input_salt: bytes, canonical: bytes) -> bytes:
    """``keccak256("secure-ci/canonical/v1" || inputSalt || canonicalBytes)``."""
    _salt(input_salt)
    return keccak256(CANONICAL_TAG + input_salt + canonical)


def payload_digest(input_salt: bytes, payload: bytes) -> bytes:
    """``keccak256(inputSalt || payload)``: the exact output bytes, bound to the input."""
    _salt(input_salt)
    return keccak256(input_salt + payload)


@dataclass(frozen=True, slots=True)
class OutputOpening:
    """What opens a result's output commitment: ``(outSalt, canonicalDigest, payloadDigest)``."""

    salt: bytes
    canonical: bytes
    payload: bytes

    def __post_init__(self) -> None:
        for name in ("salt", "canonical", "payload"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise RecordError(f"opening {name} must be 32 bytes")

    def commitment(self) -> bytes:
        """``keccak256(outSalt || canonicalDigest || payloadDigest)``."""
        return keccak256(self.salt + self.canonical + self.payload)


def open_output(
    out_salt: bytes, input_salt: bytes, canonical: bytes, payload: bytes
) -> OutputOpening:
    """The opening of an output: ``canonical`` is the output's canonical bytes, ``payload``
    its encoded bytes; ``input_salt`` the request's salt, ``out_salt`` the edge's."""
    return OutputOpening(
        out_salt, canonical_digest(input_salt, canonical), payload_digest(input_salt, payload)
    )
