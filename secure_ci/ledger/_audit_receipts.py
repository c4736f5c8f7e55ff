"""Device receipts as an auditor reads them: a strictly validated JSON file, verified.

A device keeps, for every task an edge answered, the device-signed ``TaskRequest`` and the
enclave-signed ``TaskResult`` (``secure-ci device receipts --export FILE`` writes them). An
auditor given such a file (``secure-ci audit verify --receipts FILE``) holds the edge to what
its enclave signed: an anchored record that differs from a receipt's result for the same edge
sequence number or the same request is an equivocation, and a receipt whose task was never
anchored after its window is an omission (``_audit_claims``).

The file is hostile input: it must not frame an honest edge. Every receipt's result must
answer its request and both signatures must recover (the request's to its device, the
result's to the request's edge) before anything is compared; a receipt that fails is an
error naming it (exit 1), never a finding. The format (``docs/ledger-format.md`` 6.4)::

    {"format": "secure-ci/device-receipts/v1", "chain_id": <int>, "contract": "0x<40 hex>",
     "receipts": [{"request": {<TaskRequest fields>}, "result": {<TaskResult fields>},
                   "device_sig": "0x<130 hex>", "edge_sig": "0x<130 hex>"}, ...]}

Field names are the records' (snake case: ``task_id``, ``device_seq``, ``prev_request``,
``edge_seq``, ...); ``bytes`` fields are ``0x`` + lowercase hex of their exact size,
integers are JSON integers in their type's range. Every object has exactly its keys (no
more, no fewer, none twice); at most ``MAX_RECEIPTS_FILE_BYTES`` bytes and
``MAX_RECEIPTS`` receipts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from secure_ci.exceptions import RecordError, SignatureError
from secure_ci.ledger._records import LedgerDomain, TaskRequest, TaskResult

__all__ = [
    "MAX_RECEIPTS",
    "MAX_RECEIPTS_FILE_BYTES",
    "RECEIPTS_FORMAT",
    "DeviceReceipt",
    "encode_receipts",
    "parse_receipts",
]

RECEIPTS_FORMAT = "secure-ci/device-receipts/v1"
MAX_RECEIPTS_FILE_BYTES = 64 << 20
MAX_RECEIPTS = 40_000  # a receipt is about 1.5 KB of JSON

# field -> (kind, size): "b" bytes of size, "a" 20-byte address, "u" unsigned of size bits
_REQUEST = {
    "task_id": ("b", 32), "device": ("b", 20), "device_seq": ("u", 64), "model_id": ("b", 32),
    "cut": ("u", 16), "input_commitment": ("b", 32), "edge": ("b", 20), "deadline": ("u", 64),
    "prev_request": ("b", 32),
}  # fmt: skip
_RESULT = {
    "task_id": ("b", 32), "request_hash": ("b", 32), "output_commitment": ("b", 32),
    "measurement": ("b", 32), "quote_id": ("b", 32), "status": ("u", 8),
    "latency_ms": ("u", 32), "edge_seq": ("u", 64),
}  # fmt: skip
_HEX = frozenset("0123456789abcdef")
_MAX_DEPTH = 8  # the format nests 4 deep; the C JSON scanner can overflow the stack on more
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than ``_MAX_DEPTH`` before the JSON parser sees it."""
    depth = 0
    for match in _TOKENS.finditer(text):
        mark = match.group()
        if mark in ("[", "{"):
            depth += 1
            if depth > _MAX_DEPTH:
                raise RecordError(f"receipts file nests deeper than {_MAX_DEPTH} levels")
        elif mark in ("]", "}"):
            depth -= 1


@dataclass(frozen=True, slots=True)
class DeviceReceipt:
    """A verified receipt: the device's signed request and the enclave's signed result."""

    request: TaskRequest
    result: TaskResult
    device_sig: bytes
    edge_sig: bytes

    @property
    def edge(self) -> bytes:
        return self.request.edge


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RecordError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise RecordError(f"{name} is not a JSON number")


def _object(value: object, keys: Iterable[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be a JSON object")
    wanted = set(keys)
    if set(value) != wanted:
        missing, extra = sorted(wanted - set(value)), sorted(set(value) - wanted)
        raise RecordError(f"{where}: missing keys {missing}, unknown keys {extra}")
    return value


def _hex(value: object, size: int, where: str) -> bytes:
    if (
        not isinstance(value, str)
        or len(value) != 2 + 2 * size
        or not value.startswith("0x")
        or not set(value[2:]) <= _HEX
    ):
        raise RecordError(f"{where} must be 0x and {2 * size} lowercase hex digits")
    return bytes.fromhex(value[2:])


def _uint(value: object, bits: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise RecordError(f"{where} must be an integer in [0, 2^{bits})")
    return value


def _fields(value: object, spec: dict[str, tuple[str, int]], where: str) -> dict[str, Any]:
    obj = _object(value, spec, where)
    return {
        name: _hex(obj[name], size, f"{where}.{name}")
        if kind == "b"
        else _uint(obj[name], size, f"{where}.{name}")
        for name, (kind, size) in spec.items()
    }


def _receipt(value: object, domain: LedgerDomain, where: str) -> DeviceReceipt:
    obj = _object(value, ("request", "result", "device_sig", "edge_sig"), where)
    request = TaskRequest(**_fields(obj["request"], _REQUEST, f"{where}.request"))
    result = TaskResult(**_fields(obj["result"], _RESULT, f"{where}.result"))
    device_sig = _hex(obj["device_sig"], 65, f"{where}.device_sig")
    edge_sig = _hex(obj["edge_sig"], 65, f"{where}.edge_sig")
    if not result.matches(request):
        raise RecordError(f"{where}: the result does not answer the request")
    try:
        device = request.recover(device_sig, domain)
        edge = result.recover(edge_sig, domain)
    except SignatureError as exc:
        raise SignatureError(f"{where}: a signature does not recover ({exc})") from exc
    if device != request.device:
        raise SignatureError(
            f"{where}: the request is not signed by its device 0x{request.device.hex()}"
        )
    if edge != request.edge:
        raise SignatureError(
            f"{where}: the result is not signed by the request's edge 0x{request.edge.hex()}"
            f" (it recovers to 0x{edge.hex()}): a forged receipt"
        )
    return DeviceReceipt(request, result, device_sig, edge_sig)


def parse_receipts(
    data: bytes, domain: LedgerDomain, *, max_bytes: int = MAX_RECEIPTS_FILE_BYTES
) -> list[DeviceReceipt]:
    """The verified receipts of a receipts file for ``domain`` (at most ``max_bytes``).

    Raises RecordError when the file is oversized, not the format, or for another chain or
    contract, and SignatureError when a receipt's signature does not hold (each naming the
    receipt). Nothing is returned unless every receipt verifies.
    """
    if len(data) > max_bytes:
        raise RecordError(f"receipts file is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
        _check_depth(text)
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RecordError(f"receipts file is not JSON: {exc}") from exc
    except ValueError as exc:  # int conversion limits
        raise RecordError(f"receipts file is not valid: {exc}") from exc
    top = _object(doc, ("format", "chain_id", "contract", "receipts"), "receipts file")
    if top["format"] != RECEIPTS_FORMAT:
        raise RecordError(f"receipts file format must be {RECEIPTS_FORMAT!r}")
    chain_id = _uint(top["chain_id"], 256, "chain_id")
    contract = _hex(top["contract"], 20, "contract")
    if (chain_id, contract) != (domain.chain_id, domain.contract):
        raise RecordError(
            f"the receipts are for chain {chain_id} contract 0x{contract.hex()}, not the audited"
            f" chain {domain.chain_id} contract 0x{domain.contract.hex()}"
        )
    items = top["receipts"]
    if not isinstance(items, list):
        raise RecordError("receipts must be a JSON list")
    if len(items) > MAX_RECEIPTS:
        raise RecordError(f"more than {MAX_RECEIPTS} receipts")
    return [_receipt(item, domain, f"receipt {i}") for i, item in enumerate(items)]


def _json_fields(record: TaskRequest | TaskResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(record).__slots__:
        value = getattr(record, name)
        out[name] = "0x" + value.hex() if isinstance(value, bytes) else value
    return out


def encode_receipts(domain: LedgerDomain, receipts: Iterable[DeviceReceipt]) -> bytes:
    """The receipts file of ``receipts`` (what :func:`parse_receipts` reads)."""
    items = [
        {
            "request": _json_fields(r.request),
            "result": _json_fields(r.result),
            "device_sig": "0x" + r.device_sig.hex(),
            "edge_sig": "0x" + r.edge_sig.hex(),
        }
        for r in receipts
    ]
    if len(items) > MAX_RECEIPTS:
        raise RecordError(f"more than {MAX_RECEIPTS} receipts")
    doc = {
        "format": RECEIPTS_FORMAT,
        "chain_id": domain.chain_id,
        "contract": "0x" + domain.contract.hex(),
        "receipts": items,
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
