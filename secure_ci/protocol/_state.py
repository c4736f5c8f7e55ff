"""The protocol state machine: one table, shared by both ends of a connection.

Rules (the table below is the whole truth; ``Connection`` only adds per-task bookkeeping):

1. The handshake is strictly alternating: the device sends ``Hello``, the edge ``HelloAck``,
   the device ``Authenticate``, the edge ``AuthOk``. Nothing else may be sent before it.
2. In ``READY`` the device sends ``InferRequest`` and ``Challenge``; the edge sends
   ``InferResult`` and per-task ``Error`` (an ``Error`` with a ``task_id``), each answering
   exactly one request in flight. Several requests may be in flight (pipelining).
   The device may also send a ``Ping`` (one at a time), which the edge answers with a
   ``Pong``.
3. After a ``Challenge`` the device sends nothing but ``Close`` until the edge has answered
   with ``Evidence``: features never travel before fresh evidence has been checked. The
   edge may keep answering requests already in flight.
4. A fatal ``Error`` (no ``task_id``) may be sent by either side in any state that is not
   ``CLOSED`` and ends the connection.
5. ``Close`` may be sent by either side in any state; a side that sent ``Close`` sends
   nothing more, while the other may still answer what is in flight and then close. The
   connection is ``CLOSED`` when both sides have closed.
6. A protocol violation (malformed frame, forbidden event, timeout) puts the connection in
   ``ERROR``: the side that saw it may still send a fatal ``Error`` and ``Close``.
"""

from __future__ import annotations

from enum import Enum

from secure_ci.protocol._codes import Role
from secure_ci.protocol._events import (
    Authenticate,
    AuthOk,
    Challenge,
    Error,
    Event,
    Evidence,
    Hello,
    HelloAck,
    InferRequest,
    InferResult,
    Ping,
    Pong,
)

__all__ = ["FATAL_ERROR", "TASK_ERROR", "TRANSITIONS", "State", "transition_key"]


class State(Enum):
    """Connection states, named after what the connection waits for."""

    AWAIT_HELLO = "await-hello"
    AWAIT_HELLO_ACK = "await-hello-ack"
    AWAIT_AUTHENTICATE = "await-authenticate"
    AWAIT_AUTH_OK = "await-auth-ok"
    READY = "ready"
    CHALLENGED = "challenged"
    ERROR = "error"
    CLOSED = "closed"


TASK_ERROR = "task-error"
"""Transition key of an ``Error`` that ends one task (it has a ``task_id``)."""
FATAL_ERROR = "fatal-error"
"""Transition key of an ``Error`` that ends the connection (no ``task_id``)."""

TransitionKey = tuple[Role, type[Event] | str]

_D, _E = Role.DEVICE, Role.EDGE
TRANSITIONS: dict[State, dict[TransitionKey, State]] = {
    State.AWAIT_HELLO: {(_D, Hello): State.AWAIT_HELLO_ACK},
    State.AWAIT_HELLO_ACK: {(_E, HelloAck): State.AWAIT_AUTHENTICATE},
    State.AWAIT_AUTHENTICATE: {(_D, Authenticate): State.AWAIT_AUTH_OK},
    State.AWAIT_AUTH_OK: {(_E, AuthOk): State.READY},
    State.READY: {
        (_D, InferRequest): State.READY,
        (_D, Challenge): State.CHALLENGED,
        (_D, Ping): State.READY,
        (_E, InferResult): State.READY,
        (_E, TASK_ERROR): State.READY,
        (_E, Pong): State.READY,
    },
    State.CHALLENGED: {
        (_E, Evidence): State.READY,
        (_E, Pong): State.CHALLENGED,
        (_E, InferResult): State.CHALLENGED,
        (_E, TASK_ERROR): State.CHALLENGED,
    },
    State.ERROR: {},
    State.CLOSED: {},
}
# Rules 4 and 6: a fatal error ends every state but CLOSED.
for _state, _row in TRANSITIONS.items():
    if _state is not State.CLOSED:
        _row.update({(_D, FATAL_ERROR): State.CLOSED, (_E, FATAL_ERROR): State.CLOSED})


def transition_key(event: Event) -> type[Event] | str:
    """The table column of ``event``: its type, or which kind of ``Error`` it is."""
    if isinstance(event, Error):
        return FATAL_ERROR if event.task_id is None else TASK_ERROR
    return type(event)
