"""Signed task records on the device side: build a signed request, check a signed result.

Sans-IO: the session feeds encoded bytes in and gets events and records out. Every
request/result pair that verified is kept as a :class:`TaskReceipt`, which the ledger side
(``secure_ci.ledger.ReceiptBook.track``) turns into an anchored receipt later. A result's
output commitment opens to the output's canonical digest under the model's rule (the device
decodes the payload to recompute it) and its payload digest: the receipt keeps that opening,
which a dispute reveals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from secure_ci.device._identity import DeviceIdentity
from secure_ci.exceptions import CodecError, RecordError, SignatureError
from secure_ci.ledger._canonical import OutputOpening, open_output
from secure_ci.ledger._records import LedgerDomain, TaskRequest, TaskResult, commitment, task_id_for
from secure_ci.partition._canonical import DEFAULT_CANONICAL, CanonicalRule, canonical_bytes
from secure_ci.protocol import InferRequest, InferResult

__all__ = ["EnclaveBinding", "TaskReceipt", "sign_request", "verify_result"]


@dataclass(frozen=True)
class EnclaveBinding:
    """What an attested session tells us about the enclave that signs results."""

    address: bytes
    measurement: bytes
    quote_id: bytes


@dataclass(frozen=True)
class TaskReceipt:
    """One finished task: both signed records, plus the salts that open their commitments
    and the opening of the output commitment (None for a receipt from an older journal)."""

    request: TaskRequest
    result: TaskResult
    device_sig: bytes = field(repr=False)
    edge_sig: bytes = field(repr=False)
    input_salt: bytes = field(repr=False)
    output_salt: bytes = field(repr=False)
    domain: LedgerDomain
    opening: OutputOpening | None = field(default=None, repr=False)


def sign_request(
    identity: DeviceIdentity,
    *,
    enclave: EnclaveBinding,
    domain: LedgerDomain,
    task_id: bytes | None = None,
    model_id: bytes,
    cut: int,
    codec: str,
    device_seq: int,
    deadline: int,
    salt: bytes,
    payload: bytes,
    prev_request: bytes = bytes(32),
) -> tuple[InferRequest, TaskRequest]:
    """The ``InferRequest`` event and the ``TaskRequest`` record it carries, signed.

    ``task_id`` defaults to :func:`~secure_ci.ledger.task_id_for` (which calldata leaves out);
    ``prev_request`` is the struct hash of the previous request on the session (zero first).
    """
    input_commitment = commitment(salt, payload)
    if task_id is None:
        task_id = task_id_for(identity.address, input_commitment)
    record = TaskRequest(
        task_id=task_id,
        device=identity.address,
        device_seq=device_seq,
        model_id=model_id,
        cut=cut,
        input_commitment=input_commitment,
        edge=enclave.address,
        deadline=deadline,
        prev_request=prev_request,
    )
    event = InferRequest(
        prev_request=prev_request,
        task_id=task_id,
        model_id=model_id,
        cut=cut,
        codec=codec,
        device_seq=device_seq,
        deadline=deadline,
        salt=salt,
        payload=payload,
        signature=identity.sign(record.digest(domain)),
    )
    return event, record


def verify_result(
    result: InferResult,
    sent: InferRequest,
    record: TaskRequest,
    *,
    enclave: EnclaveBinding,
    domain: LedgerDomain,
    canonical: CanonicalRule = DEFAULT_CANONICAL,
    max_bytes: int = 64 << 20,
) -> TaskReceipt:
    """Check that the attested enclave signed ``result`` as the answer to ``record``, with
    an output commitment that opens to the payload under the model's ``canonical`` rule
    (``max_bytes``: decoded size limit).

    Raises :class:`SignatureError` if not. A failure status is signed evidence too: it is
    returned like success and the caller decides what it means.
    """
    try:
        output = canonical_bytes(canonical, result.payload, max_bytes=max_bytes)
        opening = open_output(result.salt, sent.salt, output, result.payload)
        signed = TaskResult(
            task_id=result.task_id,
            request_hash=record.struct_hash(),
            output_commitment=opening.commitment(),
            measurement=enclave.measurement,
            quote_id=enclave.quote_id,
            status=result.status,
            latency_ms=result.latency_ms,
            edge_seq=result.edge_seq,
        )
        signer = signed.recover(result.signature, domain)
    except (RecordError, CodecError) as exc:
        raise SignatureError(f"result record is malformed: {exc}") from None
    if signer != enclave.address or result.task_id != record.task_id:
        raise SignatureError("result is not signed by the attested enclave for this task")
    return TaskReceipt(
        request=record,
        result=signed,
        device_sig=sent.signature,
        edge_sig=result.signature,
        input_salt=sent.salt,
        output_salt=result.salt,
        domain=domain,
        opening=opening,
    )
