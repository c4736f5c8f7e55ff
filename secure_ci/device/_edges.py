"""One edge as a fleet device sees it: its session, kept up in the background, its live
estimates and its circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from secure_ci.device._breaker import Breaker
from secure_ci.device._session import Session
from secure_ci.exceptions import ChannelError, SecureCIError
from secure_ci.ledger._registry import RegisteredEdge
from secure_ci.plan import EdgeEstimator

__all__ = ["EdgeLink"]

log = logging.getLogger("secure_ci.device._fleet")


class EdgeLink:
    """One edge: its session (kept by :meth:`keep`), estimates and breaker."""

    def __init__(self, name: str, registration: RegisteredEdge | None, breaker: Breaker) -> None:
        self.name = name
        self.registration = registration
        self.estimator = EdgeEstimator()
        self.breaker = breaker
        self.session: Session | None = None
        self.ready = asyncio.Event()
        """Set once the first connection attempt ended (up or failed)."""
        self.last_used = 0.0
        """When a task last completed here (monotonic): an edge idle for longer than the
        probe interval is probed, so its estimates follow its link while it gets no task."""
        self._probes = 0

    def usable(self, now: float) -> bool:
        s = self.session
        return s is not None and not s.failed and self.breaker.allows(now)

    async def keep(
        self,
        connect: Callable[[], AbstractAsyncContextManager[Session]],
        closing: asyncio.Event,
        monotonic: Callable[[], float],
        probe_interval: float | None = None,
        on_end: Callable[[Session], None] | None = None,
    ) -> None:
        """Hold a session: connect, probe it while it is idle (every ``probe_interval``
        seconds), wait for it to fail, back off (the breaker), reconnect; until ``closing``
        is set; ``on_end`` sees each session once it has ended."""
        while not closing.is_set():
            try:
                async with connect() as session:
                    self.session = session
                    self.breaker.success(monotonic())
                    self.ready.set()
                    log.info("session with edge %s is up", self.name)
                    noticed = _Noticer(self, monotonic)
                    session.on_failure(noticed)  # at once, not when this keeper wakes up
                    try:
                        await self._hold(session, closing, monotonic, probe_interval)
                    finally:
                        noticed.ended = True  # from here on, we end it ourselves
                    if on_end is not None:
                        session.fail(ChannelError("the session is closed"))  # no-op if failed
                        on_end(session)
            except (SecureCIError, OSError) as exc:
                log.warning("cannot connect to edge %s: %s", self.name, exc)
                self.breaker.failure(monotonic())
            finally:
                self.session = None
            self.ready.set()
            delay = max(0.05, self.breaker.retry_at - monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await closing.wait()

    async def _hold(
        self,
        session: Session,
        closing: asyncio.Event,
        monotonic: Callable[[], float],
        probe_interval: float | None,
    ) -> None:
        """Until the session fails or ``closing`` is set, probing it while it is idle."""
        failed = asyncio.ensure_future(session.wait_failed())
        stop = asyncio.ensure_future(closing.wait())
        try:
            while not (failed.done() or stop.done()):
                await asyncio.wait(
                    {failed, stop}, timeout=probe_interval, return_when=asyncio.FIRST_COMPLETED
                )
                idle = probe_interval is not None and (
                    monotonic() - self.last_used >= probe_interval
                )
                if idle and not (failed.done() or stop.done()):
                    await self._probe(session, monotonic)
        finally:
            for waiter in (failed, stop):
                waiter.cancel()

    async def _probe(self, session: Session, monotonic: Callable[[], float]) -> None:
        """Ping the edge, every other time padded to the link's probe size: the round trip
        and the bandwidth of a link no task uses."""
        link = self.estimator.link
        self._probes += 1
        padding = link.probe_bytes() if self._probes % 2 == 0 else 0
        sent = monotonic()
        try:
            await session.ping(padding)
        except SecureCIError:
            return  # the session failed: the keeper sees it
        now = monotonic()
        nbytes = padding + self.estimator.ping_bytes
        self.estimator.observe_ping((now - sent) * 1e3, now, nbytes=nbytes)


class _Noticer:
    """Says that a session failed, and opens the edge's breaker, the moment it fails (the
    session calls it from its reader), unless the keeper ended the session itself."""

    def __init__(self, edge: EdgeLink, monotonic: Callable[[], float]) -> None:
        self.edge = edge
        self.monotonic = monotonic
        self.ended = False

    def __call__(self, why: SecureCIError) -> None:
        if not self.ended:  # the edge crashed, closed, went silent or lied
            log.warning("session with edge %s failed: %s", self.edge.name, why)
            self.edge.breaker.failure(self.monotonic())
