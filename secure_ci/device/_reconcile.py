"""Reconcile the device journal with the ledger: receipts checked, overdue tasks challenged.

What ``device receipts --check`` does once, and what a fleet device with a ledger does in the
background (:func:`keep_reconciled`) whenever the chain answers: each journalled task of this
device is looked up on chain (an anchored task is looked up again, as a chain that lost its
state has lost it too); a task overdue past ``grace`` is challenged with its signed receipt;
a request that got no result is challenged with the signed request alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from secure_ci.exceptions import ContractRevertError, SecureCIError

if TYPE_CHECKING:
    from secure_ci.device._identity import DeviceIdentity
    from secure_ci.device._journal import DeviceJournal
    from secure_ci.ledger import LedgerClient
    from secure_ci.ledger._records import LedgerDomain

__all__ = ["Reconciled", "keep_reconciled", "reconcile"]

log = logging.getLogger("secure_ci.device")


@dataclass(frozen=True)
class Reconciled:
    """What one pass changed: tasks found anchored, lost by the chain, challenged; requests
    without a result challenged; and the tasks still waiting for their anchor."""

    anchored: int = 0
    unanchored: int = 0
    challenged: int = 0
    requests_challenged: int = 0
    waiting: int = 0

    def __str__(self) -> str:
        return (
            f"{self.anchored} newly anchored, {self.unanchored} no longer on chain, "
            f"{self.challenged} challenged, {self.requests_challenged} unanswered request(s) "
            f"challenged, {self.waiting} waiting"
        )


async def reconcile(
    book: DeviceJournal,
    ledger: LedgerClient,
    identity: DeviceIdentity,
    *,
    domain: LedgerDomain,
    grace: int = 60,
) -> Reconciled:
    """One pass over ``book`` for ``identity``'s tasks under ``domain`` (see the module)."""
    from eth_account import Account

    from secure_ci.ledger import ReceiptBook

    account = Account.from_key(identity.key)
    # the accepted result of each task: a superseded one (a late answer to an attempt the
    # task had left) shares its task id and must neither stand in for it nor lose its state
    tasks = [
        t
        for t in book.tasks()
        if t.state in ("answered", "anchored")
        and t.receipt.request.device == identity.address
        and t.receipt.domain == domain
    ]
    receipts = ReceiptBook(ledger, domain, account, grace_seconds=grace)
    for task in tasks:
        r = task.receipt
        receipts.track(r.request, r.result, r.device_sig, r.edge_sig)
    now = await ledger.timestamp()
    await receipts.check(now)
    anchored = unanchored = challenged = waiting = 0
    for task in tasks:
        if task.task_id in receipts.receipts:
            if task.state != "anchored":
                book.mark_anchored(task, receipts.receipts[task.task_id].encode())
                anchored += 1
            continue
        if task.state == "anchored":
            book.mark_unanchored(task)  # the chain no longer has it
            unanchored += 1
        pending = receipts.pending.get(task.task_id)
        if pending is not None and pending.challenge_id is not None:
            book.mark_challenged(task, pending.challenge_id)
            challenged += 1
        else:
            waiting += 1
    requests = 0
    for u in list(book.unanswered()):
        q = u.request
        if u.challenge_id is not None or q.device != identity.address or u.domain != domain:
            continue
        if now <= q.deadline + grace:
            continue
        try:
            challenge_id = await ledger.challenge_request_once(account, q, u.device_sig)
        except ContractRevertError as exc:  # this one is refused: the others still go
            log.warning("request 0x%s not challenged: %s", q.task_id.hex(), exc)
            continue
        book.mark_request_challenged(q, challenge_id)
        requests += 1
    return Reconciled(anchored, unanchored, challenged, requests, waiting)


async def keep_reconciled(
    book: DeviceJournal,
    ledger: LedgerClient,
    identity: DeviceIdentity,
    *,
    domain: LedgerDomain,
    interval: float,
    grace: int = 60,
    on_pass: Callable[[Reconciled], None] | None = None,
) -> None:
    """Reconcile every ``interval`` seconds until cancelled. A chain that does not answer
    is logged and tried again at the next interval: nothing in the journal is lost, it is
    reconciled once the chain is back."""
    down = False
    while True:
        try:
            done = await reconcile(book, ledger, identity, domain=domain, grace=grace)
            if on_pass is not None:
                on_pass(done)
        except (SecureCIError, OSError, ValueError) as exc:  # the chain is down or refuses
            if not down:
                log.warning("journal not reconciled with the ledger (will retry): %s", exc)
            down = True
        except Exception as exc:  # a bug: said every time, and the device carries on
            log.error("journal reconciliation failed (will retry): %r", exc)
            down = True
        else:
            if down:
                log.info("ledger reachable again; journal reconciled: %s", done)
            elif done != Reconciled(waiting=done.waiting):
                log.info("journal reconciled: %s", done)
            down = False
        await asyncio.sleep(interval)
