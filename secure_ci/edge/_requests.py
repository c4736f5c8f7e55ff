"""Checking one request: its record and signature, beside its features on their way.

A request's features are decoded against the registered boundary specs before anything runs
(on the event loop when small, in a checker thread otherwise), while its ``TaskRequest``
record (input commitment, struct hash, signature recovery) is checked in a checker thread at
the same time. The tail may run before that check ends, but the worker waits for it before it
signs, journals or answers anything: a request whose record fails is answered with its error
and leaves no record. This keeps the signature check off a lone request's critical path.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from secure_ci.edge._models import Features
from secure_ci.exceptions import ProtocolError, RecordError, SignatureError
from secure_ci.ledger._records import LedgerDomain, TaskRequest, commitment
from secure_ci.protocol import ErrorCode, InferRequest

__all__ = ["INLINE_DECODE_BYTES", "Job", "verify_request"]

INLINE_DECODE_BYTES = 16 << 10
"""Payloads up to this size are decoded on the event loop (tens of microseconds); larger ones
in a checker thread, so the loop keeps serving other sessions."""


@dataclass(frozen=True)
class Job:
    """One request on its way through the batcher: its features now, its checked record
    (or the reason it failed) when ``record`` resolves."""

    request: InferRequest
    record: Future[TaskRequest]
    features: Features
    received_at: float


def verify_request(
    request: InferRequest, *, device: bytes, edge: bytes, domain: LedgerDomain
) -> TaskRequest:
    """The request's ``TaskRequest`` record, if ``device`` signed it for this ``edge``."""
    try:
        record = TaskRequest(
            task_id=request.task_id,
            device=device,
            device_seq=request.device_seq,
            model_id=request.model_id,
            cut=request.cut,
            input_commitment=commitment(request.salt, request.payload),
            edge=edge,
            deadline=request.deadline,
            prev_request=request.prev_request,
        )
        signer = record.recover(request.signature, domain)
    except (RecordError, SignatureError) as exc:
        raise ProtocolError(f"bad request record: {exc}", code=ErrorCode.BAD_SIGNATURE) from None
    if signer != device:
        raise ProtocolError(
            "request not signed by the session's device", code=ErrorCode.BAD_SIGNATURE
        )
    return record
