"""Compact, canonical calldata encoding of a batch of task records.

Calldata is priced per byte (16 gas per non-zero byte, and under Prague's EIP-7623 floor 40),
so a batch carries only what cannot be derived. Per batch: a header and three tables
(devices, models, enclave identities = measurement || quote id). Per record, about 97 bytes:
the two commitments, small fields and table indices. Derived, hence omitted:

- ``request.edge`` (the batch's edge), ``result.taskId`` (= the request's), ``result.requestHash``
  (recomputed) and ``result.edgeSeq`` (``firstSeq + index``);
- ``request.taskId`` when it is the default :func:`task_id_for` (device, input commitment);
- ``request.prevRequest`` and ``request.device`` when the previous request of the device's
  chain is in the same batch: a back reference to it replaces both;
- the device signature of a record whose chain continues in the batch: the next request's
  signature covers this one through its ``prevRequest``. A signature is kept at every
  ``SIGNATURE_INTERVAL``-th link, so checking any record walks at most that many hashes;
- the enclave signature: the anchoring transaction must be sent by the edge's registered
  enclave key, so that key's transaction signature covers every record of the batch
  (devices keep the per-record enclave signature in their receipts).

::

    batch  = version u8 (2) | flags u8 | edge 20 | firstSeq u64 | count u32
             [flags & 1: previous epoch's last head 32 | previous epoch u32]
             nDev u16 | dev 20 * nDev | nModel u16 | model 32 * nModel
             nEnclave u16 | (measurement 32 | quoteId 32) * nEnclave | record * count
    record = kind u8 | (kind & 1 ? dev u16 | prevRequest 32 : back u16)
             | deviceSeq u64 | model u16 | cut u16 | inputCommitment 32 | deadline u64
             | outputCommitment 32 | enclave u16 | status u8 | latencyMs u32
             | [kind & 2: taskId 32] | [kind & 4: deviceSig 65]

``back`` counts records back to the chain's previous request. Tables list entries in order of
first use with no duplicates, and every choice above is a function of the records, so every
batch has exactly one encoding; the decoder checks it by re-encoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from secure_ci.exceptions import RecordError
from secure_ci.ledger._records import TaskRequest, TaskResult, task_id_for

__all__ = [
    "MAX_BATCH_RECORDS",
    "SIGNATURE_INTERVAL",
    "AnchoredRecord",
    "BatchRecords",
    "chain_links",
    "chain_successors",
    "covering_signature",
    "decode_batch",
    "encode_batch",
    "published",
    "signed_positions",
]

MAX_BATCH_RECORDS = 2048
"""The contract's ``MAX_BATCH_RECORDS``: it refuses a larger batch, so none decodes."""
SIGNATURE_INTERVAL = 32
_VERSION = 2
_FLAG_LINK = 1
_START, _TASK_ID, _SIG = 1, 2, 4
_HEADER = struct.Struct(">BB20sQI")
_LINK = struct.Struct(">32sI")
_CHAIN_START = struct.Struct(">H32s")
_BACK = struct.Struct(">H")
_BODY = struct.Struct(">QHH32sQ32sHBI")
_MAX_RECORD = 1 + _CHAIN_START.size + _BODY.size + 32 + 65


@dataclass(frozen=True, slots=True)
class AnchoredRecord:
    """One task as published: the request, the result and the device's signature.

    ``device_sig`` is empty when the batch left it out because a later request of the same
    chain in the batch covers it (see :func:`chain_successor`).
    """

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


def chain_links(records: tuple[AnchoredRecord, ...] | list[AnchoredRecord]) -> list[int]:
    """For each record the index of its chain predecessor in the batch, or -1.

    A record links to the latest earlier record whose request hash is its ``prevRequest``
    when both come from the same device; otherwise its chain starts in this batch.
    """
    latest: dict[bytes, int] = {}
    links = []
    for i, rec in enumerate(records):
        j = latest.get(rec.request.prev_request, -1)
        if j >= 0 and records[j].request.device != rec.request.device:
            j = -1
        links.append(j)
        latest[rec.result.request_hash] = i
    return links


def signed_positions(links: list[int]) -> list[bool]:
    """Which records keep their device signature: chain ends and every interval-th link."""
    depth = [0] * len(links)
    has_successor = [False] * len(links)
    for i, j in enumerate(links):
        if j >= 0:
            depth[i] = depth[j] + 1
            has_successor[j] = True
    return [
        not has_successor[i] or depth[i] % SIGNATURE_INTERVAL == SIGNATURE_INTERVAL - 1
        for i in range(len(links))
    ]


def encode_batch(batch: BatchRecords) -> bytes:
    """The canonical calldata bytes of ``batch`` (RecordError if it is inconsistent)."""
    records = batch.records
    if not 0 < len(records) <= MAX_BATCH_RECORDS:
        raise RecordError(f"a batch holds 1..{MAX_BATCH_RECORDS} records")
    if len(batch.edge) != 20 or not 0 <= batch.first_seq <= (1 << 64) - len(records):
        raise RecordError("bad batch edge or first sequence number")
    links = chain_links(records)
    signed = signed_positions(links)
    devices, dev_index = _table(
        [r.request.device for r, j in zip(records, links, strict=True) if j < 0]
    )
    models, model_index = _table([r.request.model_id for r in records])
    enclaves, enc_index = _table([r.result.measurement + r.result.quote_id for r in records])
    flags = _FLAG_LINK if batch.epoch_link is not None else 0
    parts = [_HEADER.pack(_VERSION, flags, batch.edge, batch.first_seq, len(records))]
    try:
        if batch.epoch_link is not None:
            parts.append(_LINK.pack(*batch.epoch_link))
    except struct.error as exc:
        raise RecordError(f"bad epoch link: {exc}") from exc
    for table, width in ((devices, 20), (models, 32), (enclaves, 64)):
        parts.append(len(table).to_bytes(2, "big"))
        parts.extend(entry[:width] for entry in table)
    for i, rec in enumerate(records):
        req, res = rec.request, rec.result
        if (
            req.edge != batch.edge
            or res.task_id != req.task_id
            or res.edge_seq != batch.first_seq + i
        ):
            raise RecordError(f"record {i} does not belong to this batch")
        explicit_id = req.task_id != task_id_for(req.device, req.input_commitment)
        kind = (_START if links[i] < 0 else 0) | (_TASK_ID if explicit_id else 0)
        kind |= _SIG if signed[i] else 0
        parts.append(bytes((kind,)))
        if links[i] < 0:
            parts.append(_CHAIN_START.pack(dev_index[req.device], req.prev_request))
        else:
            parts.append(_BACK.pack(i - links[i]))
        parts.append(
            _BODY.pack(
                req.device_seq, model_index[req.model_id], req.cut, req.input_commitment,
                req.deadline, res.output_commitment, enc_index[res.measurement + res.quote_id],
                res.status, res.latency_ms,
            )
        )  # fmt: skip
        if explicit_id:
            parts.append(req.task_id)
        if signed[i]:
            if len(rec.device_sig) != 65:
                raise RecordError(f"record {i} needs its 65-byte device signature")
            parts.append(rec.device_sig)
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


def _decode_records(
    data: bytes, pos: int, count: int, tables: tuple[list[bytes], ...], edge: bytes, first: int
) -> list[AnchoredRecord]:
    devices, models, enclaves = tables
    records: list[AnchoredRecord] = []
    hashes: list[bytes] = []
    end = len(data)
    for i in range(count):
        if pos + 1 + _BACK.size + _BODY.size > end:
            raise RecordError(f"batch calldata truncated in record {i}")
        kind = data[pos]
        pos += 1
        if kind & ~(_START | _TASK_ID | _SIG):
            raise RecordError(f"record {i} has an unknown kind {kind:#x}")
        if kind & _START:
            if pos + _CHAIN_START.size > end:
                raise RecordError(f"batch calldata truncated in record {i}")
            dev, prev = _CHAIN_START.unpack_from(data, pos)
            device = devices[dev]
            pos += _CHAIN_START.size
        else:
            (back,) = _BACK.unpack_from(data, pos)
            if not 0 < back <= i:
                raise RecordError(f"record {i} refers back past the batch start")
            device, prev = records[i - back].request.device, hashes[i - back]
            pos += _BACK.size
        if pos + _BODY.size > end:
            raise RecordError(f"batch calldata truncated in record {i}")
        seq, model, cut, input_c, deadline, output_c, enc, status, latency = _BODY.unpack_from(
            data, pos
        )
        pos += _BODY.size
        optional = (32 if kind & _TASK_ID else 0) + (65 if kind & _SIG else 0)
        if pos + optional > end:
            raise RecordError(f"batch calldata truncated in record {i}")
        if kind & _TASK_ID:
            task_id, pos = data[pos : pos + 32], pos + 32
        else:
            task_id = task_id_for(device, input_c)
        sig, pos = (data[pos : pos + 65], pos + 65) if kind & _SIG else (b"", pos)
        request = TaskRequest(
            task_id, device, seq, models[model], cut, input_c, edge, deadline, prev
        )  # fmt: skip
        hashes.append(request.struct_hash())
        enclave = enclaves[enc]
        result = TaskResult(
            task_id, hashes[i], output_c, enclave[:32], enclave[32:], status, latency, first + i
        )
        records.append(AnchoredRecord(request, result, sig))
    if pos != end:
        raise RecordError("batch calldata has bytes after its last record")
    return records


def decode_batch(data: bytes, *, verify_canonical: bool = True) -> BatchRecords:
    """Parse batch calldata strictly: RecordError on any malformed, oversized or odd input."""
    if not isinstance(data, bytes):
        raise RecordError("batch calldata must be bytes")
    if len(data) > _HEADER.size + _LINK.size + 6 + MAX_BATCH_RECORDS * (_MAX_RECORD + 116):
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
    try:
        records = _decode_records(data, pos, count, (devices, models, enclaves), edge, first_seq)
    except IndexError as exc:
        raise RecordError("batch record refers past the end of a table") from exc
    batch = BatchRecords(edge, first_seq, tuple(records), link)
    if verify_canonical and encode_batch(batch) != data:
        raise RecordError("batch calldata is not in canonical form")
    return batch


def chain_successors(links: list[int]) -> list[int]:
    """For each record the first later record whose chain predecessor it is, or -1.

    A record whose signature the batch left out is checked through this successor's
    ``prevRequest``, and so on until a signed record (at most ``SIGNATURE_INTERVAL`` steps).
    """
    successors = [-1] * len(links)
    for i, j in enumerate(links):
        if j >= 0 and successors[j] < 0:
            successors[j] = i
    return successors


def published(batch: BatchRecords) -> BatchRecords:
    """``batch`` as its calldata decodes: without the device signatures the encoding leaves out."""
    keep = signed_positions(chain_links(batch.records))
    records = tuple(
        r if k else AnchoredRecord(r.request, r.result, b"")
        for r, k in zip(batch.records, keep, strict=True)
    )
    return BatchRecords(batch.edge, batch.first_seq, records, batch.epoch_link)


def covering_signature(
    records: tuple[AnchoredRecord, ...], successors: list[int], index: int
) -> tuple[TaskRequest, bytes]:
    """The request whose device signature covers record ``index``, with that signature.

    The record's own, or that of the first signed request down its chain (decoded records
    link by construction: each successor's ``prevRequest`` is its predecessor's hash).
    """
    i = index
    for _ in range(SIGNATURE_INTERVAL + 1):
        if records[i].device_sig:
            return records[i].request, records[i].device_sig
        i = successors[i]
        if i < 0:
            break
    raise RecordError(f"no signed request of its chain covers record {index}")
