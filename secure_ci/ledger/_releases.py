"""The device's cached view of the release registry, refreshed at least every N blocks.

A device refuses an edge whose measurement is not a release valid on chain now. Asking the
chain on every connect would put a node round trip (or several) on each handshake, so the
device keeps a :class:`ReleaseCache`: a snapshot of every release, rebuilt incrementally from
the contract's release events. :meth:`ReleaseCache.view` asks the chain's block number at most
once per ``head_ttl`` seconds (a node round trip costs milliseconds; keep ``head_ttl`` at or
below the chain's block time); while the snapshot is at most ``max_age_blocks`` blocks behind
that head it is used as it is, otherwise the release events of the new blocks are read and the
releases they touched re-read. Validity is judged at the snapshot's block timestamp (the
contract's clock, not the device's), so a suspension or an expiry takes effect for new sessions
from the next refresh: at most ``max_age_blocks`` blocks (plus ``head_ttl``) later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from secure_ci.exceptions import AuthorizationError, ConfigError
from secure_ci.ledger._governance import RELEASE_MEASUREMENT, RELEASE_MODEL, ReleaseInfo
from secure_ci.ledger._registry import LOG_CHUNK_BLOCKS

__all__ = [
    "DEFAULT_HEAD_TTL",
    "DEFAULT_MAX_AGE_BLOCKS",
    "ReleaseCache",
    "ReleaseSource",
    "ReleaseView",
]

DEFAULT_MAX_AGE_BLOCKS = 5
"""Blocks a release view may lag the chain before it is refreshed."""
DEFAULT_HEAD_TTL = 1.0
"""Seconds the chain's block number is trusted before it is asked again."""


class ReleaseSource(Protocol):
    """Where releases come from (LedgerClient is one)."""

    async def block_number(self) -> int: ...

    async def block_timestamp(self, block: int) -> int: ...

    async def release_events(self, first: int, last: int) -> list[tuple[int, bytes]]: ...

    async def release(self, kind: int, digest: bytes) -> ReleaseInfo: ...


@dataclass(frozen=True)
class ReleaseView:
    """Every release as of ``block`` (whose timestamp is ``timestamp``)."""

    block: int
    timestamp: int
    releases: Mapping[tuple[int, bytes], ReleaseInfo] = field(default_factory=dict)

    def state(self, kind: int, digest: bytes) -> str:
        """``valid``, ``suspended``, ``not-yet-valid``, ``expired`` or ``unknown``."""
        found = self.releases.get((kind, digest))
        return "unknown" if found is None else found.state_at(self.timestamp)

    def require_valid(self, kind: int, digest: bytes, what: str = "edge") -> None:
        """AuthorizationError unless the release is valid at the view's block."""
        state = self.state(kind, digest)
        if state != "valid":
            name = "measurement" if kind == RELEASE_MEASUREMENT else "model"
            raise AuthorizationError(
                f"{what}: {name} {digest.hex()} is not a release valid on the ledger now "
                f"({state} at block {self.block})"
            )


class ReleaseCache:
    """A :class:`ReleaseView` kept at most ``max_age_blocks`` behind the chain."""

    def __init__(
        self,
        source: ReleaseSource,
        *,
        first_block: int = 0,
        max_age_blocks: int = DEFAULT_MAX_AGE_BLOCKS,
        head_ttl: float = DEFAULT_HEAD_TTL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_age_blocks, bool) or not isinstance(max_age_blocks, int):
            raise ConfigError("max_age_blocks must be a whole number")
        if max_age_blocks < 0:
            raise ConfigError("max_age_blocks must be >= 0")
        if not 0 <= head_ttl <= 3600:
            raise ConfigError("head_ttl must be 0..3600 seconds")
        self._source = source
        self._next_block = first_block
        self.max_age_blocks = max_age_blocks
        self.head_ttl = head_ttl
        self._monotonic = monotonic
        self._head_asked: float | None = None
        self._view: ReleaseView | None = None
        self._lock = asyncio.Lock()
        self.refreshes = 0

    async def view(self) -> ReleaseView:
        """The view, refreshed first when it is more than ``max_age_blocks`` old."""
        view, now = self._view, self._monotonic()
        asked = self._head_asked
        if view is not None and asked is not None and now - asked < self.head_ttl:
            return view
        latest = await self._source.block_number()
        self._head_asked = now
        if view is not None and latest - view.block <= self.max_age_blocks:
            return view
        return await self.refresh(latest)

    async def refresh(self, latest: int | None = None) -> ReleaseView:
        """Apply the release events up to ``latest`` (default: the latest block)."""
        async with self._lock:
            source = self._source
            if latest is None:
                latest = await source.block_number()
            if self._view is not None and self._view.block >= latest:
                return self._view
            releases = dict(self._view.releases) if self._view is not None else {}
            touched: dict[tuple[int, bytes], None] = {}
            first = self._next_block
            while first <= latest:
                last = min(first + LOG_CHUNK_BLOCKS - 1, latest)
                for kind, digest in await source.release_events(first, last):
                    if kind in (RELEASE_MEASUREMENT, RELEASE_MODEL):
                        touched.setdefault((kind, digest), None)
                first = last + 1
            for kind, digest in touched:
                releases[(kind, digest)] = await source.release(kind, digest)
            timestamp = await source.block_timestamp(latest)
            self._view = ReleaseView(latest, timestamp, releases)
            self._next_block = latest + 1
            self.refreshes += 1
            return self._view
