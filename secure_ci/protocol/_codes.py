"""Protocol constants: supported versions and the error codes that travel in error frames."""

from __future__ import annotations

from enum import Enum, IntEnum

__all__ = ["PROTOCOL_VERSIONS", "ErrorCode", "Role"]

PROTOCOL_VERSIONS: tuple[int, ...] = (3,)
"""Versions this implementation speaks, in order of preference (highest last).

2: ``InferRequest`` carries ``prev_request`` (the request chain of the TaskRequest record).
3: ``InferResult`` carries ``queue_us`` and ``compute_us`` (the edge's queue wait and tail
time: what a device's planner needs to tell the network's share of a round trip).
Older peers are refused at the hello.
"""


class Role(Enum):
    """Which end of a connection: the device opens it, the edge (enclave) accepts it."""

    DEVICE = "device"
    EDGE = "edge"

    @property
    def peer(self) -> Role:
        return Role.EDGE if self is Role.DEVICE else Role.DEVICE


class ErrorCode(IntEnum):
    """Numeric codes of :class:`~secure_ci.protocol.Error` frames and ``ProtocolError.code``."""

    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    UNAUTHORIZED = 3
    FRAME_TOO_LARGE = 4
    UNKNOWN_MODEL = 5
    BAD_TENSOR = 6
    REPLAY = 7
    BUSY = 8
    TIMEOUT = 9
    INTERNAL = 10
    BAD_SIGNATURE = 11
    SHUTTING_DOWN = 12
    UNEXPECTED = 13
