"""``FramedStream``: the thin asyncio driver of a sans-IO protocol ``Connection``.

It reads from the stream only when the connection needs data, wakes the connection's timer at
its deadline (handshake and idle timeouts live in the protocol core, not here), and writes
whatever ``send`` returns. Transport failures become :class:`ChannelError`; protocol faults
stay :class:`ProtocolError` so the caller can answer with an error frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable

from secure_ci.exceptions import ChannelError, SecureCIError
from secure_ci.protocol import NEED_DATA, Close, Connection, Error, Event

__all__ = ["FramedStream"]

READ_SIZE = 1 << 16


class FramedStream:
    """Pumps bytes between ``reader``/``writer`` and ``connection``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: Connection,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.connection = connection
        self._clock = clock
        self._eof = False
        self.bytes_sent = 0
        """Protocol bytes written (frames, before TLS); a metric."""
        self.bytes_received = 0

    async def next_event(self) -> Event:
        """The next event from the peer; raises ProtocolError (timeouts too) or ChannelError."""
        conn = self.connection
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                return event
            if self._eof:
                raise ChannelError("the peer closed the connection")
            deadline = conn.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - self._clock())
            try:
                async with asyncio.timeout(delay):
                    data = await self.reader.read(READ_SIZE)
                    self.bytes_received += len(data)
            except TimeoutError:
                conn.handle_timer(self._clock())
                continue
            except (OSError, ssl.SSLError):
                data = b""  # an abortive close is an end of stream for the protocol
            self._eof = not data
            conn.receive_data(data, self._clock())

    async def send(self, event: Event) -> None:
        """Encode ``event`` through the state machine and write it."""
        data = self.connection.send(event, self._clock())
        self.bytes_sent += len(data)
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (OSError, ssl.SSLError) as exc:
            raise ChannelError(f"peer went away: {exc}") from exc

    async def send_fatal(self, exc: SecureCIError) -> None:
        """Best effort: report ``exc`` as a fatal error frame and close our side."""
        with contextlib.suppress(SecureCIError):
            if not self.connection.our_closed:
                await self.send(Error.from_exception(exc))
                await self.send(Close())

    async def aclose(self, *, grace: float = 1.0) -> None:
        """Close the transport (TLS close_notify when the peer still listens)."""
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(grace):
                await self.writer.wait_closed()
