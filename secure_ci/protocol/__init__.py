"""Sans-IO device <-> edge wire protocol: frames, events and the connection state machine.

Imports no torch, asyncio, ssl or socket: the asyncio layer (``secure_ci.channel``) feeds a
:class:`Connection` bytes and writes what it returns, which also makes it easy to fuzz.
"""

from __future__ import annotations

from secure_ci.protocol._binding import channel_binding, enclave_key_binding
from secure_ci.protocol._capabilities import MODEL_CAPABILITY, model_capability, wanted_models
from secure_ci.protocol._codes import PROTOCOL_VERSIONS, ErrorCode, Role
from secure_ci.protocol._connection import NEED_DATA, Connection, NeedData
from secure_ci.protocol._events import (
    Authenticate,
    AuthOk,
    Challenge,
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
from secure_ci.protocol._frames import Limits, encode_frame
from secure_ci.protocol._state import State

__all__ = [
    "MODEL_CAPABILITY",
    "NEED_DATA",
    "PROTOCOL_VERSIONS",
    "AuthOk",
    "Authenticate",
    "Challenge",
    "Close",
    "Connection",
    "Error",
    "ErrorCode",
    "Event",
    "Evidence",
    "Hello",
    "HelloAck",
    "InferRequest",
    "InferResult",
    "Limits",
    "NeedData",
    "Ping",
    "Pong",
    "Role",
    "State",
    "channel_binding",
    "decode_event",
    "enclave_key_binding",
    "encode_event",
    "encode_frame",
    "model_capability",
    "wanted_models",
]
