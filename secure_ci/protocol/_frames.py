"""Framing: ``u32 frame length || u16 header length || header || payload``.

The length prefix counts everything after itself. Sizes are checked against :class:`Limits`
from the prefixes alone, before a body is buffered, so a hostile peer cannot make us hold more
than one maximal frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from secure_ci.exceptions import ConfigError, LocalProtocolError, RemoteProtocolError
from secure_ci.protocol._codes import ErrorCode

__all__ = ["FrameBuffer", "Limits", "RawFrame", "encode_frame"]

_PREFIX = struct.Struct(">I")
_HEADER_LEN = struct.Struct(">H")
_MIN_FRAME = _HEADER_LEN.size + 1  # a header is never empty


@dataclass(frozen=True)
class Limits:
    """Resource limits of one connection; timeouts are in the caller's clock units (seconds)."""

    max_frame_bytes: int = (8 << 20) + (8 << 10)
    max_header_bytes: int = 4096
    max_payload_bytes: int = 8 << 20
    max_in_flight: int = 32
    handshake_timeout: float = 10.0
    idle_timeout: float | None = 60.0
    """Seconds without traffic or work in flight before the connection times out; None
    turns the idle timer off (a device keeps a quiet session; the edge decides)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_header_bytes <= 0xFFFF:
            raise ConfigError("max_header_bytes must be in 1..65535")
        if not _MIN_FRAME <= self.max_frame_bytes <= 0xFFFFFFFF:
            raise ConfigError("max_frame_bytes must be in 3..2**32-1")
        if self.max_payload_bytes < 0 or self.max_in_flight < 1:
            raise ConfigError("max_payload_bytes must be >= 0 and max_in_flight >= 1")
        if not self.handshake_timeout > 0 or not (
            self.idle_timeout is None or self.idle_timeout > 0
        ):
            raise ConfigError("timeouts must be positive")


@dataclass(frozen=True)
class RawFrame:
    """One frame split into its header bytes and payload bytes, not yet interpreted."""

    header: bytes
    payload: bytes


def encode_frame(header: bytes, payload: bytes, limits: Limits) -> bytes:
    """Frame ``header`` and ``payload``; refuses what the peer would refuse under ``limits``."""
    _check_sizes(len(header), len(payload), limits, LocalProtocolError)
    body_len = _HEADER_LEN.size + len(header) + len(payload)
    if body_len > limits.max_frame_bytes:
        raise LocalProtocolError("frame too large", code=ErrorCode.FRAME_TOO_LARGE)
    return b"".join((_PREFIX.pack(body_len), _HEADER_LEN.pack(len(header)), header, payload))


def _check_sizes(
    header_len: int,
    payload_len: int,
    limits: Limits,
    error: type[LocalProtocolError] | type[RemoteProtocolError],
) -> None:
    if header_len == 0:
        raise error("empty frame header", code=ErrorCode.MALFORMED)
    if header_len > limits.max_header_bytes:
        raise error(
            f"frame header of {header_len} bytes exceeds {limits.max_header_bytes}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    if payload_len > limits.max_payload_bytes:
        raise error(
            f"frame payload of {payload_len} bytes exceeds {limits.max_payload_bytes}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )


class FrameBuffer:
    """Accumulates received bytes and cuts them into :class:`RawFrame` values."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._body_len: int | None = None  # known once the 4-byte prefix has been checked

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held right now."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[RawFrame]:
        """Append ``data`` and return the frames it completes, raising on an invalid one."""
        self._buffer += data
        frames: list[RawFrame] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return frames
            frames.append(frame)

    def _next_frame(self) -> RawFrame | None:
        if self._body_len is None:
            if len(self._buffer) < _PREFIX.size:
                return None
            (body_len,) = _PREFIX.unpack_from(self._buffer)
            if body_len > self._limits.max_frame_bytes:
                raise RemoteProtocolError(
                    f"frame of {body_len} bytes exceeds {self._limits.max_frame_bytes}",
                    code=ErrorCode.FRAME_TOO_LARGE,
                )
            if body_len < _MIN_FRAME:
                raise RemoteProtocolError("frame too short", code=ErrorCode.MALFORMED)
            self._body_len = body_len
        end = _PREFIX.size + self._body_len
        if len(self._buffer) < _PREFIX.size + _HEADER_LEN.size:
            return None
        (header_len,) = _HEADER_LEN.unpack_from(self._buffer, _PREFIX.size)
        payload_len = self._body_len - _HEADER_LEN.size - header_len
        if payload_len < 0:
            raise RemoteProtocolError("header longer than its frame", code=ErrorCode.MALFORMED)
        _check_sizes(header_len, payload_len, self._limits, RemoteProtocolError)
        if len(self._buffer) < end:
            return None
        start = _PREFIX.size + _HEADER_LEN.size
        frame = RawFrame(
            header=bytes(self._buffer[start : start + header_len]),
            payload=bytes(self._buffer[start + header_len : end]),
        )
        del self._buffer[:end]
        self._body_len = None
        return frame
