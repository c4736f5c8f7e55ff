"""The sans-IO connection: bytes in, events out; events in, bytes out; deadlines as data.

A :class:`Connection` never reads a clock, sleeps or touches a socket. The caller feeds it
received bytes with the current time, drains :meth:`Connection.next_event` until it returns
``NEED_DATA``, writes what :meth:`Connection.send` returns, and calls
:meth:`Connection.handle_timer` when :meth:`Connection.next_deadline` has passed (like
aioquic's ``get_timer``/``handle_timer``). Peer faults raise :class:`RemoteProtocolError`
from ``next_event``/``handle_timer`` and leave the connection in ``ERROR``, from where only a
fatal ``Error`` and ``Close`` may still be sent; our own misuse raises
:class:`LocalProtocolError` from ``send`` and changes nothing.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from secure_ci.exceptions import LocalProtocolError, ProtocolError, RemoteProtocolError
from secure_ci.protocol._codes import PROTOCOL_VERSIONS, ErrorCode, Role
from secure_ci.protocol._events import (
    Close,
    Error,
    Event,
    Evidence,
    Hello,
    HelloAck,
    InferRequest,
    InferResult,
    Ping,
    Pong,
    decode_event,
    encode_event,
)
from secure_ci.protocol._frames import FrameBuffer, Limits, RawFrame, encode_frame
from secure_ci.protocol._state import TRANSITIONS, State, transition_key

__all__ = ["NEED_DATA", "Connection", "NeedData"]

RECENT_TASKS = 4096
"""How many finished task ids a connection remembers to refuse replays (besides the strictly
increasing ``device_seq`` rule, which catches every replay on its own)."""


class NeedData(Enum):
    """Sentinel type of :data:`NEED_DATA`."""

    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA
"""Returned by :meth:`Connection.next_event` when more bytes are needed."""


class Connection:
    """One end of a device <-> edge connection."""

    def __init__(self, our_role: Role, *, limits: Limits | None = None, now: float | None = None):
        """``now`` starts the handshake clock; if omitted, the first observed time does."""
        self.our_role = our_role
        self.their_role = our_role.peer
        self.limits = limits if limits is not None else Limits()
        self.hello: Hello | None = None
        self.hello_ack: HelloAck | None = None
        self._state = State.AWAIT_HELLO
        self._frames = FrameBuffer(self.limits)
        self._pending: deque[RawFrame | ProtocolError] = deque()
        self._error: ProtocolError | None = None
        self._eof = False
        self._closed: set[Role] = set()
        self._started_at = now
        self._last_activity = now
        self._in_flight: dict[bytes, None] = {}
        self._recent: deque[bytes] = deque(maxlen=RECENT_TASKS)
        self._recent_set: set[bytes] = set()
        self._last_device_seq = -1
        self._max_in_flight = self.limits.max_in_flight
        self._before_evidence = 0  # frames the peer sent before our Evidence went out
        self._ping: bytes | None = None  # the nonce of the Ping not yet answered

    # -- introspection -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def version(self) -> int | None:
        """The negotiated protocol version, once ``HelloAck`` has passed."""
        return self.hello_ack.version if self.hello_ack else None

    @property
    def in_flight(self) -> tuple[bytes, ...]:
        """Task ids of requests not answered yet, oldest first."""
        return tuple(self._in_flight)

    @property
    def max_in_flight(self) -> int:
        """Our cap on requests in flight (a device lowers it to what the edge announced)."""
        return self._max_in_flight

    @property
    def our_closed(self) -> bool:
        return self.our_role in self._closed

    @property
    def their_closed(self) -> bool:
        """True once the peer's ``Close`` has been received: stop reading then."""
        return self.their_role in self._closed

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the transport; ``b""`` means the peer closed it."""
        self._observe(now)
        if self._error is not None:
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after end of stream", code=ErrorCode.INTERNAL)
        try:
            frames = self._frames.feed(data)
        except RemoteProtocolError as exc:
            self._pending.append(exc)
            return
        if frames:
            self._pending.extend(frames)
            self._last_activity = now

    def next_event(self) -> Event | NeedData:
        """The next event from the peer, or ``NEED_DATA``; raises on a peer fault.

        Once the peer's stream has ended after its ``Close``, every call returns ``Close()``
        (like h11's ``ConnectionClosed``), so a read loop cannot spin on an ended stream."""
        if self._error is not None:
            raise self._error
        try:
            if self._pending:
                item = self._pending.popleft()
                sent_challenged = self._before_evidence > 0
                if sent_challenged:
                    self._before_evidence -= 1
                if isinstance(item, ProtocolError):
                    raise item
                event = decode_event(item.header, item.payload)
                if sent_challenged:
                    self._check_sent_challenged(event)
                self._apply(self.their_role, event, RemoteProtocolError)
                return event
            if self._eof and self._frames.pending:
                raise RemoteProtocolError("stream ended inside a frame", code=ErrorCode.MALFORMED)
            if self._eof and not self.their_closed and self._state is not State.CLOSED:
                raise RemoteProtocolError(
                    "peer ended the stream without Close", code=ErrorCode.UNEXPECTED
                )
        except ProtocolError as exc:
            self._fail(exc)
            raise
        if self._eof:
            return Close()  # the stream is over: repeat the end marker, never wait for more
        return NEED_DATA

    # -- sending -------------------------------------------------------------------------

    def send(self, event: Event, now: float | None = None) -> bytes:
        """The bytes to write for ``event``; raises ``LocalProtocolError`` if not allowed.

        Pass ``now`` so that the idle timer restarts when an answer goes out."""
        if now is not None:
            self._observe(now)
        data = encode_frame(*encode_event(event), self.limits)
        self._apply(self.our_role, event, LocalProtocolError)
        if isinstance(event, Evidence):
            # Rule 3 for what is already here: every frame received (whole or begun) before
            # this Evidence was sent while the device was waiting for it.
            self._before_evidence = len(self._pending) + (1 if self._frames.pending else 0)
        if now is not None:
            self._last_activity = now
        return data

    # -- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must be called next, or None if no timer runs.

        The idle deadline counts from the last complete frame received or event sent (an
        answer re-arms it). While requests are in flight the connection is never idle, but the
        timer keeps running: a driver that computed the deadline before the answer went out
        wakes up, calls :meth:`handle_timer`, and finds the deadline moved past the answer."""
        if self._state in (State.ERROR, State.CLOSED) or self._started_at is None:
            return None
        if self._state not in (State.READY, State.CHALLENGED):
            return self._started_at + self.limits.handshake_timeout
        if self._last_activity is None or self.limits.idle_timeout is None:
            return None
        return self._last_activity + self.limits.idle_timeout

    def handle_timer(self, now: float) -> None:
        """Raise ``RemoteProtocolError(TIMEOUT)`` if the handshake or idle deadline passed.

        With requests in flight the idle timer only re-arms (from ``now``)."""
        self._observe(now)
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline and self._in_flight and self._is_ready:
            self._last_activity = now  # working on (or waiting for) answers: not idle
            return
        if deadline is not None and now >= deadline:
            what = "idle" if self._is_ready else "handshake"
            exc = RemoteProtocolError(f"{what} timeout", code=ErrorCode.TIMEOUT)
            self._fail(exc)
            raise exc

    # -- the state machine ---------------------------------------------------------------

    @property
    def _is_ready(self) -> bool:
        return self._state in (State.READY, State.CHALLENGED)

    def _check_sent_challenged(self, event: Event) -> None:
        """Rule 3: an event the peer sent before it could have seen our Evidence must be one
        the table allows in ``CHALLENGED`` (``Close`` or a fatal ``Error``)."""
        if isinstance(event, Close):
            return
        if (self.their_role, transition_key(event)) not in TRANSITIONS[State.CHALLENGED]:
            raise RemoteProtocolError(
                f"{type(event).__name__} sent before the Evidence it was waiting for",
                code=ErrorCode.UNEXPECTED,
            )

    def _observe(self, now: float) -> None:
        if self._started_at is None:
            self._started_at = now
        if self._last_activity is None:
            self._last_activity = now

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        self._state = State.ERROR

    def _apply(
        self,
        role: Role,
        event: Event,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        """Check ``event`` from ``role`` against the table and bookkeeping, then commit."""
        name = type(event).__name__
        if role in self._closed:
            raise error(f"{name} after Close from the {role.value}", code=ErrorCode.UNEXPECTED)
        if isinstance(event, Close):
            self._closed.add(role)
            if len(self._closed) == 2 or self._state is State.ERROR:
                self._state = State.CLOSED
            return
        fatal = isinstance(event, Error) and event.task_id is None
        if self._state is State.ERROR and role is self.our_role and fatal:
            self._state = State.CLOSED  # rule 6: report the violation we saw
            return
        target = TRANSITIONS[self._state].get((role, transition_key(event)))
        if target is None:
            raise error(
                f"{name} from the {role.value} not allowed in state {self._state.value}",
                code=ErrorCode.UNEXPECTED,
            )
        if isinstance(event, HelloAck):
            self._check_version(event, error)
        elif isinstance(event, InferRequest):
            self._check_request(event, error)
        elif isinstance(event, Ping) and self._ping is not None:
            raise error("a Ping while another is unanswered", code=ErrorCode.UNEXPECTED)
        elif isinstance(event, Pong) and event.nonce != self._ping:
            raise error("a Pong that answers no Ping", code=ErrorCode.UNEXPECTED)
        elif isinstance(event, InferResult | Error) and event.task_id is not None:
            if event.task_id not in self._in_flight:
                raise error(f"{name} for a task not in flight", code=ErrorCode.UNEXPECTED)
            del self._in_flight[event.task_id]
        # Everything checked: commit.
        if isinstance(event, Hello):
            self.hello = event
        elif isinstance(event, HelloAck):
            self.hello_ack = event
            announced = event.limits.get("max_in_flight")
            if self.our_role is Role.DEVICE and announced:
                self._max_in_flight = min(self._max_in_flight, announced)
        elif isinstance(event, Ping):
            self._ping = event.nonce
        elif isinstance(event, Pong):
            self._ping = None
        elif isinstance(event, InferRequest):
            self._in_flight[event.task_id] = None
            self._last_device_seq = event.device_seq
            if len(self._recent) == self._recent.maxlen:
                self._recent_set.discard(self._recent[0])
            self._recent.append(event.task_id)
            self._recent_set.add(event.task_id)
        self._state = target

    def _check_version(
        self, ack: HelloAck, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        offered = self.hello.versions if self.hello else ()
        if ack.version not in offered or ack.version not in PROTOCOL_VERSIONS:
            raise error(
                f"version {ack.version} was not offered", code=ErrorCode.UNSUPPORTED_VERSION
            )

    def _check_request(
        self, request: InferRequest, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        if request.task_id in self._recent_set or request.device_seq <= self._last_device_seq:
            raise error("replayed task id or device_seq", code=ErrorCode.REPLAY)
        if len(self._in_flight) >= self._max_in_flight:
            raise error(f"more than {self._max_in_flight} requests in flight", code=ErrorCode.BUSY)
