"""What a fleet device reports per task: its attempts and how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field

from secure_ci.device._session import Output
from secure_ci.device._tasks import TaskReceipt
from secure_ci.plan import Configuration, Decision

__all__ = ["Attempt", "TaskOutcome"]


@dataclass(frozen=True)
class Attempt:
    """One try of a task at one edge: ``ok``, ``timeout``, ``failed`` (the session broke),
    ``refused`` (an error frame) or ``unverified`` (the result did not verify)."""

    edge: str
    outcome: str
    ms: float
    detail: str = ""
    sent: bool = True
    """Whether the signed request left the device (a session that had already failed, or a
    timeout while waiting for an in-flight slot, sends nothing)."""


@dataclass(frozen=True)
class TaskOutcome:
    """How one task ended: where it ran, every attempt, its output and its receipt."""

    key: int | None
    output: Output
    mode: str
    """``device`` (planned device-only), ``exit`` (the exit head was confident: the task
    ended on the device), ``edge``, ``split``, or ``local-tail`` (every edge
    failed: the tail ran here on the features the head had already computed)."""
    configuration: Configuration
    edge: str | None
    attempts: tuple[Attempt, ...]
    latency_ms: float
    receipt: TaskReceipt | None
    decision: Decision = field(repr=False)

    @property
    def failovers(self) -> int:
        return sum(a.outcome != "ok" for a in self.attempts)
