"""Protocol events: frozen values, validated when built, with one wire form each.

On the wire an event is a frame whose header is a canonical CBOR map ``{"type": name, field:
value, ...}`` holding exactly the event's fields, and whose payload carries the one bulky
field (features, output, quote) as raw bytes, or nothing. Every field has a kind that fixes
its type and bounds; a header with a missing, extra, mistyped or out-of-range field is
malformed. Building an invalid event locally raises :class:`LocalProtocolError`; receiving
one raises :class:`RemoteProtocolError` with code ``MALFORMED``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeAlias

from secure_ci._encoding import canonical_cbor, decode_cbor
from secure_ci.exceptions import LocalProtocolError, RemoteProtocolError, SecureCIError
from secure_ci.protocol._codes import ErrorCode

__all__ = [
    "AuthOk",
    "Authenticate",
    "Challenge",
    "Close",
    "Error",
    "Event",
    "Evidence",
    "Hello",
    "HelloAck",
    "InferRequest",
    "InferResult",
    "Ping",
    "Pong",
    "decode_event",
    "encode_event",
]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}\Z")
_U16, _U32, _U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
MAX_TEXT = 256
"""Longest string field (codec names, capabilities, reasons) in characters."""
MAX_ITEMS = 16
"""Most items in a list or map field (versions, capabilities, limits)."""


class _Invalid(Exception):
    """A field value is out of its kind; turned into Local/RemoteProtocolError by callers."""


def _int(value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _Invalid(f"expected an integer in {lo}..{hi}")
    return int(value)  # plain int, also for IntEnum members


def _bytes(value: object, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise _Invalid(f"expected {size} bytes")
    return value


def _text(value: object, max_len: int = MAX_TEXT) -> str:
    if type(value) is not str or len(value) > max_len or not value.isprintable():
        raise _Invalid(f"expected a printable string of at most {max_len} characters")
    return value


def _address(value: object) -> str:
    if type(value) is not str or not _ADDRESS.match(value):
        raise _Invalid("expected a 0x-prefixed 20-byte hex address")
    return value


def _items(value: object, max_items: int = MAX_ITEMS) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple) or len(value) > max_items:
        raise _Invalid(f"expected a list of at most {max_items} items")
    return tuple(value)


def _nonempty(value: tuple[Any, ...]) -> tuple[Any, ...]:
    if not value:
        raise _Invalid("expected at least one item")
    return value


def _blob(value: object) -> bytes:
    if type(value) is not bytes:
        raise _Invalid("expected bytes")
    return value


def _limits(value: object) -> Mapping[str, int]:
    if not isinstance(value, Mapping) or len(value) > MAX_ITEMS:
        raise _Invalid(f"expected a map of at most {MAX_ITEMS} entries")
    return MappingProxyType({_text(k, 64): _int(v, 0, _U64) for k, v in value.items()})


# Field kinds: name -> normaliser (wire or Python value -> validated Python value).
_KINDS: dict[str, Callable[[Any], Any]] = {
    "u16": lambda v: _int(v, 0, _U16),
    "u32": lambda v: _int(v, 0, _U32),
    "u64": lambda v: _int(v, 0, _U64),
    "cut": lambda v: _int(v, 0, _U16),
    "status": lambda v: _int(v, 0, 255),
    "version": lambda v: _int(v, 1, _U16),
    "versions": lambda v: _nonempty(tuple(_int(x, 1, _U16) for x in _items(v))),
    "id16": lambda v: _bytes(v, 16),
    "id32": lambda v: _bytes(v, 32),
    "opt_id32": lambda v: None if v is None else _bytes(v, 32),
    "sig65": lambda v: _bytes(v, 65),
    "text": _text,
    "texts": lambda v: tuple(_text(x) for x in _items(v)),
    "address": _address,
    "limits": _limits,
    "blob": _blob,
}


def _fields(**kinds: str) -> Mapping[str, str]:
    return MappingProxyType(kinds)


@dataclass(frozen=True)
class Event:
    """Base of all events. ``KIND`` maps each field to its kind; ``PAYLOAD`` names the raw
    field carried as frame payload (if any)."""

    TYPE: ClassVar[str] = ""
    KIND: ClassVar[Mapping[str, str]] = MappingProxyType({})
    PAYLOAD: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for name, kind in self.KIND.items():
            try:
                value = _KINDS[kind](getattr(self, name))
            except _Invalid as exc:
                raise LocalProtocolError(
                    f"{type(self).__name__}.{name}: {exc}", code=ErrorCode.MALFORMED
                ) from None
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Hello(Event):
    """Device -> edge: versions it speaks, its identity address, optional capabilities."""

    TYPE = "hello"
    KIND = _fields(versions="versions", device="address", capabilities="texts")
    versions: tuple[int, ...]
    device: str
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class HelloAck(Event):
    """Edge -> device: chosen version, session id, nonce to sign, enclave address, limits."""

    TYPE = "hello_ack"
    KIND = _fields(
        version="version",
        session_id="id16",
        server_nonce="id32",
        enclave="address",
        limits="limits",
    )
    version: int
    session_id: bytes
    server_nonce: bytes
    enclave: str
    limits: Mapping[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Authenticate(Event):
    """Device -> edge: the device key's signature over the channel binding."""

    TYPE = "authenticate"
    KIND = _fields(signature="sig65")
    signature: bytes


@dataclass(frozen=True)
class AuthOk(Event):
    """Edge -> device: the device is authenticated and allowed."""

    TYPE = "auth_ok"


@dataclass(frozen=True)
class Challenge(Event):
    """Device -> edge: a nonce the enclave must bind into fresh evidence."""

    TYPE = "challenge"
    KIND = _fields(nonce="id32")
    nonce: bytes


@dataclass(frozen=True)
class Evidence(Event):
    """Edge -> device: a fresh quote binding the TLS key and the challenge nonce."""

    TYPE = "evidence"
    KIND = _fields(quote="blob")
    PAYLOAD = "quote"
    quote: bytes


@dataclass(frozen=True)
class Ping(Event):
    """Device -> edge: a probe of the channel; ``padding`` (ignored bytes) lets the device
    time a transfer of known size as well as the round trip. One at a time."""

    TYPE = "ping"
    KIND = _fields(nonce="id32", padding="blob")
    PAYLOAD = "padding"
    nonce: bytes
    padding: bytes = b""


@dataclass(frozen=True)
class Pong(Event):
    """Edge -> device: the answer to the ``Ping`` with this nonce."""

    TYPE = "pong"
    KIND = _fields(nonce="id32")
    nonce: bytes


@dataclass(frozen=True)
class InferRequest(Event):
    """Device -> edge: encoded boundary features of one task, signed by the device."""

    TYPE = "infer_request"
    KIND = _fields(
        task_id="id32",
        model_id="id32",
        cut="cut",
        codec="text",
        device_seq="u64",
        deadline="u64",
        salt="id32",
        payload="blob",
        signature="sig65",
        prev_request="id32",
    )
    PAYLOAD = "payload"
    task_id: bytes
    model_id: bytes
    cut: int
    codec: str
    device_seq: int
    deadline: int
    salt: bytes
    payload: bytes
    signature: bytes
    prev_request: bytes = bytes(32)  # the TaskRequest's prevRequest (request chain)


@dataclass(frozen=True)
class InferResult(Event):
    """Edge -> device: encoded output of one task, signed by the enclave."""

    TYPE = "infer_result"
    KIND = _fields(
        task_id="id32",
        status="status",
        payload="blob",
        salt="id32",
        edge_seq="u64",
        latency_ms="u32",
        signature="sig65",
        queue_us="u32",
        compute_us="u32",
    )
    PAYLOAD = "payload"
    task_id: bytes
    status: int
    payload: bytes
    salt: bytes
    edge_seq: int
    latency_ms: int
    signature: bytes
    queue_us: int = 0
    """Microseconds the task waited at the edge before its batch ran (protocol 3; unsigned:
    a planning hint, not evidence)."""
    compute_us: int = 0
    """Microseconds its batch's tail took at the edge (protocol 3; unsigned, as above)."""


@dataclass(frozen=True)
class Error(Event):
    """Either side: a failure with a code; with ``task_id`` it ends one task, else the
    connection."""

    TYPE = "error"
    KIND = _fields(code="u16", reason="text", task_id="opt_id32")
    code: int
    reason: str
    task_id: bytes | None = None

    @classmethod
    def from_exception(cls, exc: SecureCIError, task_id: bytes | None = None) -> Error:
        """The error frame that reports ``exc`` to the peer (reason cut to fit)."""
        code = getattr(exc, "code", ErrorCode.INTERNAL)
        reason = "".join(c if c.isprintable() else "?" for c in str(exc))[:MAX_TEXT]
        return cls(code=int(code), reason=reason, task_id=task_id)


@dataclass(frozen=True)
class Close(Event):
    """Either side: nothing more will be sent."""

    TYPE = "close"


EventType: TypeAlias = type[Event]
_BY_TYPE: dict[str, EventType] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        HelloAck,
        Authenticate,
        AuthOk,
        Challenge,
        Evidence,
        Ping,
        Pong,
        InferRequest,
        InferResult,
        Error,
        Close,
    )
}


def encode_event(event: Event) -> tuple[bytes, bytes]:
    """The (header, payload) byte strings of ``event``."""
    header: dict[str, Any] = {"type": event.TYPE}
    for name in event.KIND:
        if name != event.PAYLOAD:
            value = getattr(event, name)
            header[name] = dict(value) if isinstance(value, Mapping) else value
    payload = getattr(event, event.PAYLOAD) if event.PAYLOAD else b""
    return canonical_cbor(header), payload


def decode_event(header: bytes, payload: bytes) -> Event:
    """Parse one frame's header and payload, raising ``RemoteProtocolError(MALFORMED)``."""
    try:
        value = decode_cbor(header, max_bytes=len(header))
    except (SecureCIError, RecursionError) as exc:
        raise _malformed(f"frame header: {exc}") from None
    if type(value) is not dict or type(value.get("type")) is not str:
        raise _malformed("frame header is not a map with a string 'type'")
    cls = _BY_TYPE.get(value.pop("type"))
    if cls is None:
        raise _malformed("unknown event type")
    expected = {name for name in cls.KIND if name != cls.PAYLOAD}
    if set(value) != expected:
        raise _malformed(f"{cls.__name__} header fields differ from {sorted(expected)}")
    if cls.PAYLOAD is not None:
        value[cls.PAYLOAD] = payload
    elif payload:
        raise _malformed(f"{cls.__name__} carries no payload")
    try:
        return cls(**value)
    except LocalProtocolError as exc:
        raise _malformed(exc.reason) from None


def _malformed(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, code=ErrorCode.MALFORMED)
