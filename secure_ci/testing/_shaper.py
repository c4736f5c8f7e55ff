"""A deterministic user-space link shaper: a TCP proxy on loopback between device and edge.

::

    async with open_link_shaper(edge.port, uplink=Link.mbps(2.0, delay_ms=10)) as link:
        async with open_session(link.address, ...) as session:   # device -> link -> edge
            ...
            link.shape(uplink=Link.mbps(20.0, delay_ms=10))      # a bandwidth step
            link.cut()                                           # drop and refuse
            link.restore()

Each direction is a token bucket (``rate_bps``, ``burst_bytes``) followed by a fixed one-way
delay: a chunk leaves the bucket when it has the tokens, and is delivered ``delay_ms`` later
(chunks are pipelined, so delay adds latency, not serialisation). ``uplink`` is device ->
edge (client -> target), ``downlink`` edge -> device. Shaping changes at run time
(:meth:`LinkShaper.shape`) apply to the next chunk, including one already waiting for
tokens. :meth:`LinkShaper.cut` drops established connections (RST) and refuses (accept and
reset) or blackholes (accept and never answer) new ones; with ``drop=False`` established
connections freeze instead (a silent link). Nothing is random unless ``jitter`` is asked
for: then each chunk's serialisation and delay are scaled by ``1 ± jitter`` drawn from a
``random.Random(seed)``. :func:`shaper_thread` runs one on its own event loop for sync code.

When the target ends a connection (a crashed edge: its kernel closes the socket), the device
side ends as well: a reset at once (data still queued is dropped, as a reset does), an
orderly close (EOF) right behind the data queued before it, so at most the downlink's delay
later, never overtaking data; a close is not itself delayed (on a real link it would take the
one-way delay more). :meth:`LinkShaper.closes` tells when each happened (the loop's clock):
the moment a crash became observable on the wire, and when the device side was ended, for
benchmarks that time how fast a device notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

from secure_ci.exceptions import ConfigError

__all__ = [
    "Link",
    "LinkClose",
    "LinkShaper",
    "ShaperStats",
    "ThreadedShaper",
    "open_link_shaper",
    "shaper_thread",
]

T = TypeVar("T")
CutMode = Literal["refuse", "blackhole"]
_QUANTUM = 16 * 1024
_QUEUE_CHUNKS = 512  # per direction: at most 8 MiB held between bucket and delivery
_CLOSES_KEPT = 4096  # connections whose end is remembered (oldest forgotten first)


@dataclass(frozen=True)
class Link:
    """One direction of an emulated link: ``rate_bps`` (None: unlimited), burst, delay."""

    rate_bps: float | None = None
    delay_ms: float = 0.0
    burst_bytes: int = _QUANTUM

    def __post_init__(self) -> None:
        if self.rate_bps is not None and not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise ConfigError(f"rate_bps must be finite and > 0 (or None), got {self.rate_bps}")
        if not (math.isfinite(self.delay_ms) and self.delay_ms >= 0):
            raise ConfigError(f"delay_ms must be finite and >= 0, got {self.delay_ms}")
        if isinstance(self.burst_bytes, bool) or not isinstance(self.burst_bytes, int):
            raise ConfigError(f"burst_bytes must be an integer, got {self.burst_bytes!r}")
        if not 512 <= self.burst_bytes <= 1 << 30:
            raise ConfigError(f"burst_bytes must be in [512, 2**30], got {self.burst_bytes}")

    @classmethod
    def mbps(cls, mbit_s: float, *, delay_ms: float = 0.0, burst_bytes: int = _QUANTUM) -> Link:
        """A link of ``mbit_s`` megabits per second (10**6 bits)."""
        return cls(mbit_s * 1e6, delay_ms, burst_bytes)

    @property
    def quantum(self) -> int:
        """Largest chunk relayed at once (a chunk never needs more tokens than the burst)."""
        return min(self.burst_bytes, _QUANTUM)


@dataclass(frozen=True)
class ShaperStats:
    """Counters since the shaper opened."""

    connections: int
    active: int
    refused: int
    dropped: int
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True)
class LinkClose:
    """How the target ended one relayed connection (times on the shaper loop's clock, which
    is ``time.monotonic`` for the default event loop)."""

    target_at: float
    """When the shaper read the target's end (EOF or reset): the target's kernel closed it."""
    how: Literal["eof", "reset"]
    device_at: float | None
    """When the device side was ended in turn (EOF written, or reset); None while the EOF
    still waits behind data, the delay, or a frozen link."""


class _Ends:
    """The target side's end of one connection, stamped as it happens."""

    def __init__(self) -> None:
        self.target_at: float | None = None
        self.how: Literal["eof", "reset"] = "eof"
        self.device_at: float | None = None

    def target(self, at: float, how: Literal["eof", "reset"]) -> None:
        if self.target_at is None:
            self.target_at, self.how = at, how

    def device(self, at: float) -> None:
        if self.target_at is not None and self.device_at is None:
            self.device_at = at


class _Bucket:
    """A token bucket on the loop's clock; its link may change while a chunk waits."""

    def __init__(self, link: Link, clock: Callable[[], float]) -> None:
        self.link = link
        self._clock = clock
        self._tokens = float(link.burst_bytes)
        self._last = clock()
        self.changed = asyncio.Event()

    def set(self, link: Link) -> None:
        self._refill()
        self.link = link
        self._tokens = min(self._tokens, float(link.burst_bytes))
        self.changed.set()

    def _refill(self) -> None:
        now = self._clock()
        rate = self.link.rate_bps
        if rate is None:
            self._tokens = float(self.link.burst_bytes)
        else:
            gain = (now - self._last) * rate / 8.0
            self._tokens = min(float(self.link.burst_bytes), self._tokens + gain)
        self._last = now

    async def take(self, nbytes: float) -> None:
        """Wait until ``nbytes`` tokens are there (at the current rate), then spend them."""
        while True:
            self._refill()
            rate = self.link.rate_bps
            if rate is None:
                return
            need = min(nbytes, float(self.link.burst_bytes))
            if self._tokens >= need:
                self._tokens -= nbytes  # may go negative: a jittered chunk costs more
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout((need - self._tokens) * 8.0 / rate):
                    await self.changed.wait()


class _Direction:
    def __init__(self, link: Link, clock: Callable[[], float]) -> None:
        self.bucket = _Bucket(link, clock)
        self.bytes = 0


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a cut link looks to both ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class LinkShaper:
    """A running shaper (make it with :func:`open_link_shaper`); control it from its loop."""

    def __init__(
        self, target: tuple[str, int], uplink: Link, downlink: Link, jitter: float, seed: int
    ) -> None:
        loop = asyncio.get_running_loop()
        self._target = target
        self._clock = loop.time
        self._up = _Direction(uplink, self._clock)
        self._down = _Direction(downlink, self._clock)
        self._jitter = jitter
        self._random = random.Random(seed)
        self._open = asyncio.Event()
        self._open.set()
        self._mode: CutMode | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._counts = {"connections": 0, "refused": 0, "dropped": 0}
        self._ends: deque[_Ends] = deque(maxlen=_CLOSES_KEPT)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def uplink(self) -> Link:
        return self._up.bucket.link

    @property
    def downlink(self) -> Link:
        return self._down.bucket.link

    @property
    def is_cut(self) -> bool:
        return self._mode is not None

    def shape(self, *, uplink: Link | None = None, downlink: Link | None = None) -> None:
        """Change either direction now (chunks already past the bucket keep their delay)."""
        if uplink is not None:
            self._up.bucket.set(uplink)
        if downlink is not None:
            self._down.bucket.set(downlink)

    def cut(self, mode: CutMode = "refuse", *, drop: bool = True) -> None:
        """Cut the link: new connections are refused (reset) or blackholed (held silent);
        established ones are reset (``drop``) or frozen until :meth:`restore`."""
        if mode not in ("refuse", "blackhole"):
            raise ConfigError(f"cut mode must be 'refuse' or 'blackhole', not {mode!r}")
        self._mode = mode
        self._open.clear()
        if drop:
            for task in list(self._conns):
                task.cancel()
            self._counts["dropped"] += len(self._conns)

    def restore(self) -> None:
        """Reopen the link: frozen connections resume, new ones are relayed again."""
        self._mode = None
        self._open.set()

    def stats(self) -> ShaperStats:
        return ShaperStats(
            connections=self._counts["connections"],
            active=len(self._conns),
            refused=self._counts["refused"],
            dropped=self._counts["dropped"],
            bytes_up=self._up.bytes,
            bytes_down=self._down.bytes,
        )

    def closes(self) -> list[LinkClose]:
        """Every connection the target ended (crashed, closed or reset), oldest first."""
        return [
            LinkClose(e.target_at, e.how, e.device_at)
            for e in self._ends
            if e.target_at is not None
        ]

    # -- relaying -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counts["connections"] += 1
        if self._mode == "refuse":
            self._counts["refused"] += 1
            _abort(writer)
            return
        if self._mode == "blackhole":
            self._held.add(writer)  # never answered; reset when the shaper closes
            return
        relay = asyncio.create_task(self._relay(reader, writer))
        self._conns.add(relay)
        try:
            await asyncio.wait({relay})  # a cut cancels the relay, not this handler
        finally:
            relay.cancel()
            self._conns.discard(relay)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        clean = False
        ends = _Ends()
        try:
            their_reader, upstream = await asyncio.open_connection(*self._target)
            self._ends.append(ends)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, upstream, self._up))
                group.create_task(self._pipe(their_reader, writer, self._down, ends))
            clean = True
        except (OSError, ExceptionGroup):
            pass  # a reset or an unreachable edge: both ends are reset below
        finally:  # a cut (cancellation) resets both ends too, and propagates
            for end in (writer, upstream):
                if end is None:
                    continue
                if clean:
                    end.close()
                else:
                    _abort(end)
            ends.device(self._clock())

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        way: _Direction,
        ends: _Ends | None = None,
    ) -> None:
        """Relay ``source`` to ``sink`` through ``way``; ``ends`` (downlink only: the source
        is the target) is stamped when the target ends the connection. A reset raises out at
        once (the relay resets the device side); an EOF follows the data already queued."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_CHUNKS)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._deliver(queue, sink, ends))
            while True:
                await self._open.wait()
                try:
                    data = await source.read(way.bucket.link.quantum)
                except OSError:
                    if ends is not None:
                        ends.target(self._clock(), "reset")
                    raise
                if not data:
                    if ends is not None:
                        ends.target(self._clock(), "eof")
                    await queue.put(None)
                    return
                quantum = way.bucket.link.quantum
                for start in range(0, len(data), quantum):
                    chunk = data[start : start + quantum]
                    size, delay = float(len(chunk)), way.bucket.link.delay_ms
                    if self._jitter:
                        size *= self._random.uniform(1 - self._jitter, 1 + self._jitter)
                        delay *= self._random.uniform(1 - self._jitter, 1 + self._jitter)
                    await way.bucket.take(size)
                    await self._open.wait()
                    await queue.put((self._clock() + delay / 1e3, chunk))
                    way.bytes += len(chunk)

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        sink: asyncio.StreamWriter,
        ends: _Ends | None = None,
    ) -> None:
        due = -math.inf
        while (item := await queue.get()) is not None:
            due = max(due, item[0])  # jittered delays never reorder bytes
            wait = due - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._open.wait()
            sink.write(item[1])
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
        if ends is not None:
            ends.device(self._clock())

    def _reset_held(self) -> None:
        for writer in self._held:
            _abort(writer)
        self._held.clear()


@asynccontextmanager
async def open_link_shaper(
    target: int | tuple[str, int],
    *,
    uplink: Link | None = None,
    downlink: Link | None = None,
    jitter: float = 0.0,
    seed: int | None = None,
    port: int = 0,
) -> AsyncIterator[LinkShaper]:
    """Serve a shaped relay to ``target`` (a loopback port, or (host, port)) on 127.0.0.1.

    ``jitter`` (a fraction, < 1) needs a ``seed``. Leaving the block resets every connection.
    """
    if not (math.isfinite(jitter) and 0.0 <= jitter < 1.0):
        raise ConfigError(f"jitter must be in [0, 1), got {jitter}")
    if jitter and seed is None:
        raise ConfigError("jitter needs a seed (the shaper is deterministic)")
    address = ("127.0.0.1", target) if isinstance(target, int) else target
    shaper = LinkShaper(address, uplink or Link(), downlink or Link(), jitter, seed or 0)
    server = await asyncio.start_server(shaper._accept, "127.0.0.1", port)
    shaper.port = server.sockets[0].getsockname()[1]
    try:
        yield shaper
    finally:
        server.close()
        shaper.cut("refuse")
        shaper._reset_held()
        if shaper._conns:
            await asyncio.wait(set(shaper._conns))
        await server.wait_closed()


class ThreadedShaper:
    """A :class:`LinkShaper` on its own event loop thread, controlled from sync code."""

    def __init__(self, loop: asyncio.AbstractEventLoop, shaper: LinkShaper) -> None:
        self._loop = loop
        self.shaper = shaper
        self.port = shaper.port
        self.address = shaper.address

    def call(self, fn: Callable[[LinkShaper], T]) -> T:
        """Run ``fn(shaper)`` on the shaper's loop and return its value."""

        async def run() -> T:
            return fn(self.shaper)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def shape(self, *, uplink: Link | None = None, downlink: Link | None = None) -> None:
        self.call(lambda s: s.shape(uplink=uplink, downlink=downlink))

    def cut(self, mode: CutMode = "refuse", *, drop: bool = True) -> None:
        self.call(lambda s: s.cut(mode, drop=drop))

    def restore(self) -> None:
        self.call(LinkShaper.restore)

    def stats(self) -> ShaperStats:
        return self.call(LinkShaper.stats)

    def closes(self) -> list[LinkClose]:
        return self.call(LinkShaper.closes)


@contextmanager
def shaper_thread(
    target: int | tuple[str, int],
    *,
    uplink: Link | None = None,
    downlink: Link | None = None,
    jitter: float = 0.0,
    seed: int | None = None,
) -> Iterator[ThreadedShaper]:
    """:func:`open_link_shaper` on its own event loop in a daemon thread, for sync code."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    box: list[ThreadedShaper | BaseException] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        try:
            async with open_link_shaper(
                target, uplink=uplink, downlink=downlink, jitter=jitter, seed=seed
            ) as shaper:
                box.append(ThreadedShaper(loop, shaper))
                ready.set()
                await stop[0].wait()
        except Exception as exc:
            box.append(exc)
            ready.set()

    thread = threading.Thread(
        target=loop.run_until_complete, args=(main(),), name="link-shaper", daemon=True
    )
    thread.start()
    ready.wait()
    try:
        if isinstance(box[0], BaseException):
            raise box[0]
        yield box[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join()
        loop.close()
