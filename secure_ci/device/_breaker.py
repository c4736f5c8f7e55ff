"""A circuit breaker per edge: a failing edge is kept out, backing off; a flapping one gets few
tasks.

States, as in the usual breaker: *closed* (the edge gets tasks), *open* (it gets none until
``retry_at``), *half-open* (one probe task at a time; its success closes the breaker, its
failure opens it again for twice as long, up to ``max_backoff``). Any failure of a closed
breaker opens it: a crash, a hang past the adaptive timeout, a refusal or a result that
fails verification are each reason enough to try the next edge. The backoff is forgotten
only after the edge has stayed healthy for ``forgive_after`` seconds, so an edge that
flaps (fails, recovers, fails) is out for longer each time and gets few tasks.

Pure: no IO, the clock (seconds, monotonic) is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from secure_ci.exceptions import ConfigError

__all__ = ["Breaker", "BreakerState"]


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass
class Breaker:
    """One edge's breaker (see the module docstring)."""

    min_backoff: float = 0.25
    max_backoff: float = 30.0
    forgive_after: float = 60.0
    state: BreakerState = BreakerState.CLOSED
    backoff: float = 0.0
    retry_at: float = 0.0
    healthy_since: float = 0.0
    failures: int = 0
    probing: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.min_backoff <= self.max_backoff or self.forgive_after <= 0:
            raise ConfigError("breaker backoffs must satisfy 0 < min <= max, forgive_after > 0")

    def allows(self, now: float) -> bool:
        """May the edge get a task now? (A half-open breaker allows one probe at a time.)"""
        if self.state is BreakerState.OPEN and now >= self.retry_at:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.CLOSED:
            return True
        return self.state is BreakerState.HALF_OPEN and not self.probing

    def acquire(self, now: float) -> None:
        """A task was given to the edge (marks the half-open probe as taken)."""
        if self.allows(now) and self.state is BreakerState.HALF_OPEN:
            self.probing = True

    def success(self, now: float) -> None:
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self.healthy_since = now
        self.probing = False
        if self.backoff and now - self.healthy_since >= self.forgive_after:
            self.backoff = 0.0

    def failure(self, now: float) -> None:
        """The edge failed a task: open (again), backing off twice as long as last time."""
        self.failures += 1
        self.probing = False
        if self.state is BreakerState.OPEN and now < self.retry_at:
            return  # tasks already in flight when it opened: one opening per incident
        # (a failure once ``retry_at`` has passed is a failed probe, e.g. a reconnect)
        if self.backoff and now - self.healthy_since >= self.forgive_after:
            self.backoff = 0.0
        self.backoff = min(self.max_backoff, max(self.min_backoff, 2 * self.backoff))
        self.state = BreakerState.OPEN
        self.retry_at = now + self.backoff
