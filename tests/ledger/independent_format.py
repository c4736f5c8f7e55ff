"""The ledger format of ``docs/ledger-format.md`` (sections 1, 3 and 4), from that document
alone: EIP-712 hashing, signature recovery, the batch calldata codec with its canonical form,
leaves, the positional tree and its proofs. Nothing of secure-ci is imported (keccak from
eth-hash, recovery from coincurve); :mod:`independent_auditor` reads the chain with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import coincurve
from eth_hash.auto import keccak

__all__ = [
    "SIGNATURE_INTERVAL",
    "ZERO",
    "Decoded",
    "Malformed",
    "Record",
    "Request",
    "Result",
    "decode",
    "default_task_id",
    "digest",
    "encode",
    "keeps_signature",
    "leaf",
    "links",
    "merkle_levels",
    "proof_of",
    "recover",
    "root_from_proof",
    "separator",
    "word",
]

ZERO = bytes(32)
SIGNATURE_INTERVAL = 32
MAX_CALLDATA = 6_780_076
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_REQUEST_TYPE = (
    b"TaskRequest(bytes32 taskId,address device,uint64 deviceSeq,bytes32 modelId,uint16 cut,"
    b"bytes32 inputCommitment,address edge,uint64 deadline,bytes32 prevRequest)"
)
_RESULT_TYPE = (
    b"TaskResult(bytes32 taskId,bytes32 requestHash,bytes32 outputCommitment,bytes32 measurement,"
    b"bytes32 quoteId,uint8 status,uint32 latencyMs,uint64 edgeSeq)"
)
_DOMAIN_TYPE = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"


class Malformed(Exception):
    """The records do not decode (section 3)."""


def word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _a(address: bytes) -> bytes:
    return bytes(12) + address


def separator(chain_id: int, contract: bytes) -> bytes:
    return keccak(
        keccak(_DOMAIN_TYPE) + keccak(b"secure-ci") + keccak(b"1") + word(chain_id) + _a(contract)
    )


def digest(sep: bytes, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + sep + struct_hash)


def default_task_id(device: bytes, input_commitment: bytes) -> bytes:
    return keccak(device + input_commitment)


@dataclass(frozen=True)
class Request:
    task_id: bytes
    device: bytes
    device_seq: int
    model_id: bytes
    cut: int
    input_commitment: bytes
    edge: bytes
    deadline: int
    prev_request: bytes

    def struct_hash(self) -> bytes:
        return keccak(
            keccak(_REQUEST_TYPE) + self.task_id + _a(self.device) + word(self.device_seq)
            + self.model_id + word(self.cut) + self.input_commitment + _a(self.edge)
            + word(self.deadline) + self.prev_request
        )  # fmt: skip


@dataclass(frozen=True)
class Result:
    task_id: bytes
    request_hash: bytes
    output_commitment: bytes
    measurement: bytes
    quote_id: bytes
    status: int
    latency_ms: int
    edge_seq: int

    def struct_hash(self) -> bytes:
        return keccak(
            keccak(_RESULT_TYPE) + self.task_id + self.request_hash + self.output_commitment
            + self.measurement + self.quote_id + word(self.status) + word(self.latency_ms)
            + word(self.edge_seq)
        )  # fmt: skip


@dataclass(frozen=True)
class Record:
    request: Request
    result: Result
    device_sig: bytes  # empty when the batch left it out


@dataclass(frozen=True)
class Decoded:
    edge: bytes
    first_seq: int
    count: int
    epoch_link: tuple[bytes, int] | None
    records: tuple[Record, ...]


def recover(signature: bytes, message_digest: bytes) -> bytes | None:
    """The signer's address under OpenZeppelin's rules (section 1), None if it does not recover."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        return None
    if int.from_bytes(signature[32:64], "big") > _N // 2:
        return None
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes((signature[64] - 27,)), message_digest, hasher=None
        )
    except (ValueError, TypeError):
        return None
    return bytes(keccak(key.format(compressed=False)[1:])[12:])


# ------------------------------------------------------------------ section 3: calldata


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise Malformed(f"truncated in {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")


def _index(table: list[bytes], index: int, what: str) -> bytes:
    if index >= len(table):
        raise Malformed(f"{what} index {index} out of range")
    return table[index]


def decode(data: bytes) -> Decoded:
    """Decode a batch's records (Malformed on any error); canonical form is not checked."""
    if len(data) > MAX_CALLDATA:
        raise Malformed("oversized")
    r = _Reader(data)
    version, flags = r.uint(1, "header"), r.uint(1, "header")
    edge, first_seq, count = r.take(20, "header"), r.uint(8, "header"), r.uint(4, "header")
    if version != 2 or flags & ~1:
        raise Malformed("version or flags")
    if not 0 < count <= 2048 or first_seq + count > 1 << 64:
        raise Malformed("count")
    epoch = (r.take(32, "epoch link"), r.uint(4, "epoch link")) if flags & 1 else None
    tables = []
    for width in (20, 32, 64):
        n = r.uint(2, "table")
        raw = r.take(n * width, "table")
        tables.append([raw[i : i + width] for i in range(0, len(raw), width)])
    devices, models, enclaves = tables
    records: list[Record] = []
    hashes: list[bytes] = []
    for i in range(count):
        kind = r.uint(1, "record")
        if kind & ~7:
            raise Malformed("reserved kind bits")
        if kind & 1:
            device = _index(devices, r.uint(2, "record"), "device")
            prev = r.take(32, "record")
        else:
            back = r.uint(2, "record")
            if not 1 <= back <= i:
                raise Malformed("back reference")
            device, prev = records[i - back].request.device, hashes[i - back]
        body = r.take(91, "record")
        model = _index(models, int.from_bytes(body[8:10], "big"), "model")
        enclave = _index(enclaves, int.from_bytes(body[84:86], "big"), "enclave")
        input_c = body[12:44]
        task_id = r.take(32, "task id") if kind & 2 else default_task_id(device, input_c)
        sig = r.take(65, "signature") if kind & 4 else b""
        request = Request(
            task_id, device, int.from_bytes(body[0:8], "big"), model,
            int.from_bytes(body[10:12], "big"), input_c, edge,
            int.from_bytes(body[44:52], "big"), prev,
        )  # fmt: skip
        hashes.append(request.struct_hash())
        result = Result(
            task_id, hashes[i], body[52:84], enclave[:32], enclave[32:], body[86],
            int.from_bytes(body[87:91], "big"), first_seq + i,
        )  # fmt: skip
        records.append(Record(request, result, sig))
    if r.pos != len(data):
        raise Malformed("trailing bytes")
    return Decoded(edge, first_seq, count, epoch, tuple(records))


def links(records: tuple[Record, ...]) -> list[int]:
    """link(i): the latest earlier record whose request hash is i's prevRequest (same device)."""
    latest: dict[bytes, int] = {}
    out = []
    for i, rec in enumerate(records):
        j = latest.get(rec.request.prev_request, -1)
        out.append(j if j >= 0 and records[j].request.device == rec.request.device else -1)
        latest[rec.result.request_hash] = i
    return out


def keeps_signature(link: list[int]) -> list[bool]:
    depth = [0] * len(link)
    has_successor = [False] * len(link)
    for i, j in enumerate(link):
        if j >= 0:
            depth[i] = depth[j] + 1
            has_successor[j] = True
    return [
        not has_successor[i] or depth[i] % SIGNATURE_INTERVAL == SIGNATURE_INTERVAL - 1
        for i in range(len(link))
    ]


def _first_use(values: list[bytes]) -> dict[bytes, int]:
    table: dict[bytes, int] = {}
    for value in values:
        table.setdefault(value, len(table))
    return table


def encode(batch: Decoded) -> bytes | None:
    """The canonical encoding of the decoded records; None when they cannot have one (a
    signature the rules keep is missing)."""
    recs = batch.records
    link = links(recs)
    signed = keeps_signature(link)
    devices = _first_use([r.request.device for r, j in zip(recs, link, strict=True) if j < 0])
    models = _first_use([r.request.model_id for r in recs])
    enclaves = _first_use([r.result.measurement + r.result.quote_id for r in recs])
    out = [bytes((2, 1 if batch.epoch_link else 0)), batch.edge]
    out += [batch.first_seq.to_bytes(8, "big"), len(recs).to_bytes(4, "big")]
    if batch.epoch_link is not None:
        out += [batch.epoch_link[0], batch.epoch_link[1].to_bytes(4, "big")]
    for table in (devices, models, enclaves):
        out += [len(table).to_bytes(2, "big"), *table]
    for i, rec in enumerate(recs):
        q, s = rec.request, rec.result
        explicit = q.task_id != default_task_id(q.device, q.input_commitment)
        out.append(bytes(((link[i] < 0) | (2 if explicit else 0) | (4 if signed[i] else 0),)))
        if link[i] < 0:
            out += [devices[q.device].to_bytes(2, "big"), q.prev_request]
        else:
            out.append((i - link[i]).to_bytes(2, "big"))
        out += [
            q.device_seq.to_bytes(8, "big"), models[q.model_id].to_bytes(2, "big"),
            q.cut.to_bytes(2, "big"), q.input_commitment, q.deadline.to_bytes(8, "big"),
            s.output_commitment, enclaves[s.measurement + s.quote_id].to_bytes(2, "big"),
            bytes((s.status,)), s.latency_ms.to_bytes(4, "big"),
        ]  # fmt: skip
        if explicit:
            out.append(q.task_id)
        if signed[i]:
            if len(rec.device_sig) != 65:
                return None
            out.append(rec.device_sig)
    return b"".join(out)


# ------------------------------------------------------------------ section 4: tree


def leaf(seq: int, record_hash: bytes) -> bytes:
    return keccak(keccak(word(seq) + record_hash))


def merkle_levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        level = levels[-1]
        nxt = [keccak(level[j] + level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
    return levels


def proof_of(levels: list[list[bytes]], index: int) -> list[bytes]:
    proof = []
    for level in levels[:-1]:
        if index ^ 1 < len(level):
            proof.append(level[index ^ 1])
        index >>= 1
    return proof


def root_from_proof(node: bytes, proof: list[bytes], index: int, count: int) -> bytes | None:
    """The root the proof leads to, None when its length is not the position's."""
    if not 0 <= index < count:
        return None
    used, size = 0, count
    while size > 1:
        if index ^ 1 < size:
            if used >= len(proof):
                return None
            sibling = proof[used]
            used += 1
            node = keccak(node + sibling) if index & 1 == 0 else keccak(sibling + node)
        index, size = index >> 1, (size + 1) >> 1
    return node if used == len(proof) else None
