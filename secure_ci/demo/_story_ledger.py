"""Every reassignment of the story visible on the ledger.

When a task fails over, its earlier attempt was a signed request to another edge. That
attempt is on the ledger one of two ways: the edge journalled it before it died and anchored
it (from disk), or it did not, and the device still holds the signed request (its journal's
``unanswered`` table), with which it challenges that edge on chain once the request is
overdue (a request-only challenge: the edge must answer with the anchored result or a signed
refusal, else the omission is recorded against it). :func:`reassignments_on_ledger` checks
that each attempt the device sent and did not accept is one or the other; ``invisible`` is
what neither covers, and must be 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secure_ci.device import DeviceIdentity, TaskOutcome
from secure_ci.device._journal import DeviceJournal
from secure_ci.device._reconcile import reconcile
from secure_ci.ledger import AuditIndex

__all__ = ["reassignments_on_ledger"]

OVERDUE_MARGIN_S = 5


async def reassignments_on_ledger(
    ledger: Any,
    index_path: Path,
    enclaves: dict[str, bytes],
    outcomes: Sequence[TaskOutcome],
    journal: DeviceJournal,
    identity: DeviceIdentity,
) -> dict[str, Any]:
    """``enclaves``: each edge's address as the device dials it -> its enclave address.
    Call after every edge has anchored: it moves the chain's clock past the requests'
    deadlines to challenge the unanswered ones.

    The attempts are counted from ``outcomes`` (sent, not accepted) and found in the
    journal, which keeps each one's signed request: unanswered, or superseded when its
    result came after the task had moved on. An attempt the journal lacks is invisible.
    """
    sent = sum(
        a.sent and a.outcome != "ok" and a.edge in enclaves for o in outcomes for a in o.attempts
    )
    mine, ours = identity.address, set(enclaves.values())
    held = {
        (u.request.task_id, u.request.edge): u.request.deadline
        for u in journal.unanswered()
        if u.request.device == mine and u.request.edge in ours
    }
    late = {
        (t.task_id, t.receipt.request.edge)
        for t in journal.tasks(state="superseded")
        if t.receipt.request.device == mine and t.receipt.request.edge in ours
    }
    attempts = set(held) | late
    with AuditIndex(index_path, ledger.domain) as index:
        await index.sync(ledger, ["0x" + e.hex() for e in enclaves.values()])
        anchored = {(t.record.request.task_id, t.edge) for t in index.tasks(limit=1_000_000)}
    challenged: set[tuple[bytes, bytes]] = set()
    if held:
        overdue = max(held.values()) - await ledger.timestamp() + OVERDUE_MARGIN_S
        if overdue > 0:
            await ledger.advance_time(overdue)
        await reconcile(journal, ledger, identity, domain=ledger.domain, grace=0)
        for u in journal.unanswered():
            if u.challenge_id is None:
                continue
            info = await ledger.request_challenge_info(u.challenge_id)
            if info.request_hash == u.request.struct_hash():
                challenged.add((u.request.task_id, u.request.edge))
    return {
        "reassigned_attempts": sent,
        "in_journal": len(attempts),
        "anchored_by_first_edge": len(attempts & anchored),
        "request_challenged": len((attempts - anchored) & challenged),
        "invisible": len(attempts - anchored - challenged) + max(0, sent - len(attempts)),
    }
