"""Checking one request: its record and signature, and where that happens.

A request's features are decoded against the registered boundary specs before anything runs.
Its ``TaskRequest`` record (input commitment, struct hash, signature recovery) must check out
before the worker signs, journals or answers anything: a request whose record fails is
answered with its error and leaves no record. Where that work runs:

* small payloads are decoded on the event loop, large ones in a checker thread (the loop
  keeps serving other sessions);
* a lone small request (nothing else in flight at the edge) has its record checked by the
  worker right after its tail: ~0.1 ms that a third thread would not save, since a light tail
  holds the GIL between its many small ops and the threads would only contend;
* every other record is checked in a checker thread beside the tail (hashing a large payload
  releases the GIL), so that under load the worker only runs tails, signs and journals.
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
"""Payloads up to this size are decoded on the event loop and checked by the worker; larger
ones in checker threads, so the loop keeps serving other sessions."""


@dataclass(frozen=True)
class Job:
    """One request on its way through the batcher, from ``device``: its decoded features, and
    its record check running in a checker thread (``check``), or None: the worker checks it."""

    request: InferRequest
    device: bytes
    check: Future[TaskRequest] | None
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
