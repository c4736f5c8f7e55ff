"""An auditor of secure-ci's ledger written from ``docs/ledger-format.md`` alone.

It imports nothing of secure-ci: the format from :mod:`independent_format`, ABI words from
eth-abi, and the chain through a web3 object's JSON-RPC calls (``eth_call``, ``eth_getLogs``,
``eth_getTransactionByHash``, ``eth_getBlockByNumber``). Section numbers are the document's.
:func:`audit` returns, per batch, its finding (if any) and, per task ``(edge, edgeSeq)``,
whether it verifies and its finding codes. Receipt findings (section 6.4) need the device's
receipts file, which the document leaves to secure-ci's auditor; this one reads only the chain.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_hash.auto import keccak
from independent_format import (
    SIGNATURE_INTERVAL,
    ZERO,
    Decoded,
    Malformed,
    Record,
    Result,
    decode,
    digest,
    encode,
    leaf,
    links,
    merkle_levels,
    proof_of,
    recover,
    root_from_proof,
    separator,
    word,
)

__all__ = ["Audit", "Chain", "NodeInconsistent", "TaskVerdict", "audit", "check_records"]


class NodeInconsistent(Exception):
    """The node contradicts itself (a head, a log or a view that cannot be): not a finding."""


# ------------------------------------------------------------------ section 5: chain reads


def _selector(signature: str) -> bytes:
    return bytes(keccak(signature.encode())[:4])


def _topic(signature: str) -> str:
    return "0x" + keccak(signature.encode()).hex()


_ANCHOR = "anchorBatch(uint64,bytes32,uint64,uint32,bytes32,bytes)"
_ANCHOR_ARGS = ["uint64", "bytes32", "uint64", "uint32", "bytes32", "bytes"]
_BATCH_ANCHORED = _topic("BatchAnchored(address,uint64,bytes32,uint64,uint32,bytes32)")
_DEVICE_REGISTERED = _topic("DeviceRegistered(uint64,address)")
_DEVICE_REVOKED = _topic("DeviceRevoked(uint64,address)")
_EDGE_REGISTERED = _topic("EdgeRegistered(uint64,address,bytes32,bytes32,string)")
_FRAUD_PROVEN = _topic("FraudProven(address,uint64,uint8,address)")
_CHALLENGE_OPENED = _topic("ChallengeOpened(uint256,address,address,bytes32,bytes32,uint64,uint64)")
_REQUEST_CHALLENGE_OPENED = _topic(
    "RequestChallengeOpened(uint256,address,address,bytes32,bytes32,uint64)"
)
_REQUEST_REFUSED = _topic("RequestRefused(uint256,address,uint8)")


class Chain:
    """The JSON-RPC reads of section 5 through a web3 object (any node)."""

    def __init__(self, w3: Any, contract: bytes) -> None:
        self.w3, self.contract = w3, contract
        self.to = w3.to_checksum_address("0x" + contract.hex())

    async def call(self, signature: str, types: list[str], args: list[Any], out: list[str]) -> Any:
        data = _selector(signature) + abi_encode(types, args)
        raw = await self.w3.eth.call({"to": self.to, "data": "0x" + data.hex()})
        return abi_decode(out, bytes(raw))

    async def logs(self, topic: str) -> list[Any]:
        found = await self.w3.eth.get_logs(
            {"address": self.to, "fromBlock": 0, "toBlock": "latest", "topics": [topic]}
        )
        return sorted(found, key=lambda log: (int(log["blockNumber"]), int(log["logIndex"])))


def _topic_address(topic: Any) -> bytes:
    return bytes(topic)[12:]


# ------------------------------------------------------------------ section 6: the audit


@dataclass(frozen=True)
class TaskVerdict:
    accepted: bool
    reason: str
    codes: frozenset[str]


@dataclass
class Audit:
    batch_findings: dict[tuple[bytes, int], str] = field(default_factory=dict)
    tasks: dict[tuple[bytes, int], TaskVerdict] = field(default_factory=dict)
    frauds: dict[tuple[bytes, int], int] = field(default_factory=dict)
    proofs: dict[tuple[bytes, int], tuple[int, list[bytes], bytes]] = field(default_factory=dict)
    """(edge, seq) -> (batch id, positional proof, record hash) of every indexed task."""


@dataclass
class _Claims:
    """Section 6.3's enclave-signed statements from challenges: (edge, seq) and (edge, request
    hash) -> record hashes the enclave signed in ChallengeOpened; (edge, request hash) of every
    refused request."""

    signed: dict[tuple[bytes, int | bytes], set[bytes]] = field(default_factory=dict)
    refused: set[tuple[bytes, bytes]] = field(default_factory=set)


_CHALLENGE = "challenge((bytes32,bytes32,bytes32,bytes32,bytes32,uint8,uint32,uint64),bytes)"


async def _challenged_request(chain: Chain, log: Any, record_hash: bytes, sep: bytes) -> bytes:
    """6.3: the request hash of a direct ``challenge`` call's result, if it hashes to the
    log's record hash; else empty."""
    tx = await chain.w3.eth.get_transaction(log["transactionHash"])
    data = bytes(tx["input"])
    if str(tx.get("to") or "").lower() != chain.to.lower() or data[:4] != _selector(_CHALLENGE):
        return b""
    try:
        fields, _sig = abi_decode(
            ["(bytes32,bytes32,bytes32,bytes32,bytes32,uint8,uint32,uint64)", "bytes"], data[4:]
        )
    except Exception:
        return b""
    result = Result(*(bytes(f) if isinstance(f, bytes) else int(f) for f in fields))
    return result.request_hash if digest(sep, result.struct_hash()) == record_hash else b""


async def _claims(chain: Chain, sep: bytes) -> _Claims:
    out = _Claims()
    for log in await chain.logs(_CHALLENGE_OPENED):
        _task, record_hash, seq, _deadline = abi_decode(
            ["bytes32", "bytes32", "uint64", "uint64"], bytes(log["data"])
        )
        edge = _topic_address(log["topics"][2])
        out.signed.setdefault((edge, int(seq)), set()).add(bytes(record_hash))
        request = await _challenged_request(chain, log, bytes(record_hash), sep)
        if request:
            out.signed.setdefault((edge, request), set()).add(bytes(record_hash))
    opened: dict[int, tuple[bytes, bytes]] = {}
    for log in await chain.logs(_REQUEST_CHALLENGE_OPENED):
        _task, request_hash, _deadline = abi_decode(
            ["bytes32", "bytes32", "uint64"], bytes(log["data"])
        )
        challenge_id = int.from_bytes(log["topics"][1], "big")
        opened[challenge_id] = (_topic_address(log["topics"][2]), bytes(request_hash))
    for log in await chain.logs(_REQUEST_REFUSED):
        challenge_id = int.from_bytes(log["topics"][1], "big")
        if challenge_id not in opened:
            raise NodeInconsistent(f"RequestRefused for unknown request challenge {challenge_id}")
        out.refused.add(opened[challenge_id])
    return out


_Event = tuple[int, int, str, bytes, bytes]
"""A registry event: (block, log index, "device" or "edge", key, value: b"\\x01" registered,
b"" revoked, or the edge's quote id)."""


@dataclass(frozen=True)
class _Batch:
    edge: bytes
    batch_id: int
    root: bytes
    first_seq: int
    count: int
    block: int
    measurement: bytes
    timestamp: int
    decoded: Decoded


def check_records(data: bytes, edge: bytes, root: bytes, first: int, count: int, sep: bytes) -> (
    tuple[Decoded, list[list[bytes]]] | str
):  # fmt: skip
    """Rules 2-6 of section 6.1: the decoded batch and its tree, or the finding code."""
    try:
        decoded = decode(data)
    except Malformed:
        return "batch-malformed"
    if encode(decoded) != data:
        return "batch-non-canonical"
    if decoded.edge != edge:
        return "batch-wrong-edge"
    if decoded.first_seq != first or decoded.count != count:
        return "batch-range-mismatch"
    levels = merkle_levels(
        [leaf(r.result.edge_seq, digest(sep, r.result.struct_hash())) for r in decoded.records]
    )
    if levels[-1][0] != root:
        return "batch-root-mismatch"
    return decoded, levels


async def _records_of(chain: Chain, log: Any, batch_id: int, root: bytes) -> bytes | None:
    """Rule 1: the anchoring transaction's ``records``, None if it was not a direct call."""
    tx = await chain.w3.eth.get_transaction(log["transactionHash"])
    data = bytes(tx["input"])
    if str(tx.get("to") or "").lower() != chain.to.lower() or data[:4] != _selector(_ANCHOR):
        return None
    try:
        args = abi_decode(_ANCHOR_ARGS, data[4:])
    except Exception:
        return None
    if args[0] != batch_id or bytes(args[1]) != root:
        return None
    return bytes(args[5])


async def audit(w3: Any, contract: bytes, *, grace: int = 3600) -> Audit:
    """Audit every batch of every edge with a BatchAnchored event (section 6)."""
    chain = Chain(w3, contract)
    sep = separator(int(await w3.eth.chain_id), contract)
    (on_chain,) = await chain.call("domainSeparator()", [], [], ["bytes32"])
    if bytes(on_chain) != sep:
        raise NodeInconsistent("the contract's domain separator is not the documented one")
    out = Audit()
    anchored: dict[tuple[bytes, int], Any] = {}
    for log in await chain.logs(_BATCH_ANCHORED):
        anchored[(_topic_address(log["topics"][1]), int.from_bytes(log["topics"][2], "big"))] = log
    for log in await chain.logs(_FRAUD_PROVEN):
        key = (_topic_address(log["topics"][1]), int.from_bytes(log["topics"][2], "big"))
        out.frauds[key] = int(abi_decode(["uint8", "address"], bytes(log["data"]))[0])
    registry: list[_Event] = []
    for topic in (_DEVICE_REGISTERED, _DEVICE_REVOKED, _EDGE_REGISTERED):
        for log in await chain.logs(topic):
            if topic == _EDGE_REGISTERED:
                state = bytes(abi_decode(["bytes32", "bytes32", "string"], bytes(log["data"]))[1])
            else:
                state = b"\x01" if topic == _DEVICE_REGISTERED else b""
            kind = "edge" if topic == _EDGE_REGISTERED else "device"
            who = _topic_address(log["topics"][2])
            registry.append((int(log["blockNumber"]), int(log["logIndex"]), kind, who, state))
    registry.sort()
    batches: list[_Batch] = []
    times: dict[int, int] = {}
    for edge in sorted({e for e, _ in anchored}):
        state = await chain.call("edgeState(address)", ["address"], [edge], [
            "uint64", "uint64", "bytes32", "uint64", "bool", "bool", "bytes32"])  # fmt: skip
        head = ZERO
        for batch_id in range(int(state[0])):
            root, first, count, block, measurement = await chain.call(
                "batchInfo(address,uint64)", ["address", "uint64"], [edge, batch_id],
                ["bytes32", "uint64", "uint32", "uint64", "bytes32"],
            )  # fmt: skip
            (records_hash,) = await chain.call(
                "batchRecordsHash(address,uint64)", ["address", "uint64"], [edge, batch_id],
                ["bytes32"],
            )  # fmt: skip
            log = anchored.get((edge, batch_id))
            if log is None:
                raise NodeInconsistent(f"no BatchAnchored log for batch {batch_id}")
            head = keccak(head + root + records_hash + word(first) + word(count))
            if bytes(log["data"])[96:128] != head:
                raise NodeInconsistent(f"batch {batch_id}: the head chain does not hold")
            if block not in times:
                times[block] = int((await w3.eth.get_block(block))["timestamp"])
            data = await _records_of(chain, log, batch_id, root)
            if data is None or keccak(data) != records_hash:
                out.batch_findings[(edge, batch_id)] = "batch-not-direct-call"
                continue
            checked = check_records(data, edge, root, first, count, sep)
            if isinstance(checked, str):
                out.batch_findings[(edge, batch_id)] = checked
                continue
            decoded, levels = checked
            for i, rec in enumerate(decoded.records):
                record_hash = digest(sep, rec.result.struct_hash())
                out.proofs[(edge, rec.result.edge_seq)] = (
                    batch_id,
                    proof_of(levels, i),
                    record_hash,
                )
            batches.append(
                _Batch(edge, batch_id, root, first, count, block, measurement, times[block],
                       decoded)
            )  # fmt: skip
    _verify_and_find(out, batches, registry, sep, grace, await _claims(chain, sep))
    return out


def _state_at(registry: list[_Event], kind: str, key: bytes, block: int) -> bytes | None:
    """The key's last registry value in blocks <= ``block`` (None: no event)."""
    value = None
    for at, _, what, k, v in registry:
        if at > block:
            break
        if (what, k) == (kind, key):
            value = v
    return value


def _verify_and_find(
    out: Audit,
    batches: list[_Batch],
    registry: list[_Event],
    sep: bytes,
    grace: int,
    claims: _Claims,
) -> None:
    groups = Counter(
        (r.request.task_id, r.request.device, b.edge) for b in batches for r in b.decoded.records
    )
    requests = {
        (r.request.device, r.result.request_hash) for b in batches for r in b.decoded.records
    }
    for b in batches:
        recs = b.decoded.records
        link = links(recs)
        successor = [-1] * len(recs)
        for i, j in enumerate(link):
            if j >= 0 and successor[j] < 0:
                successor[j] = i
        edge_quote = _state_at(registry, "edge", b.edge, b.block)
        for i, rec in enumerate(recs):
            q, s = rec.request, rec.result
            codes = set()
            if groups[(q.task_id, q.device, b.edge)] > 1:
                codes.add("replayed-request")
            if _state_at(registry, "device", q.device, b.block) != b"\x01":
                codes.add("device-not-registered")
            if s.quote_id != edge_quote:
                codes.add("quote-id-mismatch")
            if b.timestamp > q.deadline + grace:
                codes.add("late-anchoring")
            if (
                link[i] < 0
                and q.prev_request != ZERO
                and (q.device, q.prev_request) not in requests
            ):
                codes.add("request-chain-gap")
            record_hash = out.proofs[(b.edge, s.edge_seq)][2]
            signed = claims.signed.get((b.edge, s.edge_seq), set())
            if (signed | claims.signed.get((b.edge, s.request_hash), set())) - {record_hash}:
                codes.add("challenge-equivocation")
            if (b.edge, s.request_hash) in claims.refused:
                codes.add("refusal-equivocation")
            reason = _verify(b, recs, successor, i, out.proofs[(b.edge, s.edge_seq)][1], sep)
            out.tasks[(b.edge, s.edge_seq)] = TaskVerdict(not reason, reason, frozenset(codes))


def _verify(
    b: _Batch,
    recs: tuple[Record, ...],
    successor: list[int],
    i: int,
    proof: list[bytes],
    sep: bytes,
) -> str:
    """Section 6.2: empty when the task verifies, else why not."""
    rec = recs[i]
    node = leaf(rec.result.edge_seq, digest(sep, rec.result.struct_hash()))
    if root_from_proof(node, proof, rec.result.edge_seq - b.first_seq, b.count) != b.root:
        return "proof"
    current, k = i, i
    for _ in range(SIGNATURE_INTERVAL):
        if recs[k].device_sig:
            break
        nxt = successor[k]
        if nxt < 0 or recs[nxt].request.prev_request != recs[current].request.struct_hash():
            return "device signature not covered"
        current = k = nxt
    signer = recover(recs[k].device_sig, digest(sep, recs[k].request.struct_hash()))
    if not recs[k].device_sig or signer != rec.request.device:
        return "device signature"
    if rec.result.measurement != b.measurement:
        return "measurement"
    return ""
