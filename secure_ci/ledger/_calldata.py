"""Compact, canonical calldata encoding of a batch of task records.

Calldata costs 16 gas per non-zero byte and 4 per zero byte, so a batch carries only what
cannot be derived: per batch a header and three tables (devices, models, enclave identities
= measurement || quote id), per record 190 bytes with table indices instead of repeated
addresses and hashes. Derived, hence omitted: ``request.edge`` (the batch's edge),
``result.taskId`` (= the request's), ``result.requestHash`` (recomputed), ``result.edgeSeq``
(``firstSeq + index``) and the enclave signature: the anchoring transaction must be sent by
the edge's registered enclave key, so that key's transaction signature covers every record
of the batch (devices keep the per-record enclave signature in their receipts).

::

    batch  = version u8 (1) | flags u8 | edge 20 | firstSeq u64 | count u32
             [flags & 1: previous epoch's last head 32 | previous epoch u32]
             nDev u16 | dev 20 * nDev | nModel u16 | model 32 * nModel
             nEnclave u16 | (measurement 32 | quoteId 32) * nEnclave | record * count
    record = taskId 32 | dev u16 | deviceSeq u64 | model u16 | cut u16 | inputCommitment 32
             | deadline u64 | outputCommitment 32 | enclave u16 | status u8 | latencyMs u32
             | deviceSig 65

Tables list entries in order of first use with no duplicates, so every batch has exactly one
encoding; the decoder checks it by re-encoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from secure_ci.exceptions import RecordError
from secure_ci.ledger._records import TaskRequest, TaskResult

__all__ = ["MAX_BATCH_RECORDS", "AnchoredRecord", "BatchRecords", "decode_batch", "encode_batch"]

MAX_BATCH_RECORDS = 20_000
_VERSION = 1
_FLAG_LINK = 1
_HEADER = struct.Struct(">BB20sQI")
_LINK = struct.Struct(">32sI")
_RECORD = struct.Struct(">32sHQHH32sQ32sHBI65s")


@dataclass(frozen=True, slots=True)
class AnchoredRecord:
    """One task as published: the request, the result and the device's signature."""

    request: TaskRequest
    result: TaskResult
    device_sig: bytes


@dataclass(frozen=True, slots=True)
class BatchRecords:
    """The decoded calldata of one batch. ``epoch_link`` = (previous head, previous epoch)."""

    edge: bytes
    first_seq: int
    records: tuple[AnchoredRecord, ...]
    epoch_link: tuple[bytes, int] | None = None


def _table(values: list[bytes]) -> tuple[list[bytes], dict[bytes, int]]:
    index: dict[bytes, int] = {}
    for value in values:
        if value not in index:
            index[value] = len(index)
    if len(index) > 0xFFFF:
        raise RecordError("too many distinct table entries in one batch")
    return list(index), index


def encode_batch(batch: BatchRecords) -> bytes:
    """The canonical calldata bytes of ``batch`` (RecordError if it is inconsistent)."""
    records = batch.records
    if not 0 < len(records) <= MAX_BATCH_RECORDS:
        raise RecordError(f"a batch holds 1..{MAX_BATCH_RECORDS} records")
    devices, dev_index = _table([r.request.device for r in records])
    models, model_index = _table([r.request.model_id for r in records])
    enclaves, enc_index = _table([r.result.measurement + r.result.quote_id for r in records])
    flags = _FLAG_LINK if batch.epoch_link is not None else 0
    if len(batch.edge) != 20 or not 0 <= batch.first_seq <= (1 << 64) - len(records):
        raise RecordError("bad batch edge or first sequence number")
    parts = [_HEADER.pack(_VERSION, flags, batch.edge, batch.first_seq, len(records))]
    try:
        if batch.epoch_link is not None:
            parts.append(_LINK.pack(*batch.epoch_link))
    except struct.error as exc:
        raise RecordError(f"bad epoch link: {exc}") from exc
    for table, width in ((devices, 20), (models, 32), (enclaves, 64)):
        parts.append(len(table).to_bytes(2, "big"))
        parts.extend(entry[:width] for entry in table)
    pack = _RECORD.pack
    for offset, rec in enumerate(records):
        req, res = rec.request, rec.result
        if (
            req.edge != batch.edge
            or res.task_id != req.task_id
            or res.edge_seq != batch.first_seq + offset
            or len(rec.device_sig) != 65
        ):
            raise RecordError(f"record {offset} does not belong to this batch")
        parts.append(
            pack(
                req.task_id,
                dev_index[req.device],
                req.device_seq,
                model_index[req.model_id],
                req.cut,
                req.input_commitment,
                req.deadline,
                res.output_commitment,
                enc_index[res.measurement + res.quote_id],
                res.status,
                res.latency_ms,
                rec.device_sig,
            )
        )
    return b"".join(parts)


def _take_table(data: bytes, pos: int, width: int) -> tuple[list[bytes], int]:
    if pos + 2 > len(data):
        raise RecordError("batch calldata truncated in a table header")
    n = int.from_bytes(data[pos : pos + 2], "big")
    pos += 2
    end = pos + n * width
    if end > len(data):
        raise RecordError("batch calldata truncated in a table")
    return [data[i : i + width] for i in range(pos, end, width)], end


def decode_batch(data: bytes, *, verify_canonical: bool = True) -> BatchRecords:
    """Parse batch calldata strictly: RecordError on any malformed, oversized or odd input."""
    if not isinstance(data, bytes):
        raise RecordError("batch calldata must be bytes")
    if len(data) > _HEADER.size + _LINK.size + 6 + MAX_BATCH_RECORDS * (_RECORD.size + 116):
        raise RecordError("batch calldata is oversized")
    if len(data) < _HEADER.size:
        raise RecordError("batch calldata truncated in the header")
    version, flags, edge, first_seq, count = _HEADER.unpack_from(data)
    if version != _VERSION or flags & ~_FLAG_LINK:
        raise RecordError(f"unknown batch encoding version {version} / flags {flags}")
    if not 0 < count <= MAX_BATCH_RECORDS or first_seq + count > 1 << 64:
        raise RecordError(f"bad batch record count {count}")
    pos = _HEADER.size
    link: tuple[bytes, int] | None = None
    if flags & _FLAG_LINK:
        if pos + _LINK.size > len(data):
            raise RecordError("batch calldata truncated in the epoch link")
        link = _LINK.unpack_from(data, pos)
        pos += _LINK.size
    devices, pos = _take_table(data, pos, 20)
    models, pos = _take_table(data, pos, 32)
    enclaves, pos = _take_table(data, pos, 64)
    if len(data) - pos != count * _RECORD.size:
        raise RecordError("batch calldata length does not match its record count")
    records: list[AnchoredRecord] = []
    try:
        for offset, fields in enumerate(_RECORD.iter_unpack(data[pos:])):
            (task_id, dev, device_seq, model, cut, input_c, deadline) = fields[:7]
            (output_c, enc, status, latency, sig) = fields[7:]
            request = TaskRequest(
                task_id, devices[dev], device_seq, models[model], cut, input_c, edge, deadline
            )
            enclave = enclaves[enc]
            result = TaskResult(
                task_id,
                request.struct_hash(),
                output_c,
                enclave[:32],
                enclave[32:],
                status,
                latency,
                first_seq + offset,
            )
            records.append(AnchoredRecord(request, result, sig))
    except IndexError as exc:
        raise RecordError("batch record refers past the end of a table") from exc
    batch = BatchRecords(edge, first_seq, tuple(records), link)
    if verify_canonical and encode_batch(batch) != data:
        raise RecordError("batch calldata is not in canonical form")
    return batch
