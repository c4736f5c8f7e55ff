"""Redundant inference: one task to k attested edges, accepted only when a majority agrees.

The head runs once; the same encoded features go to every session with the same salt, so
every edge sees the same input commitment and (default) task id: the k results are answers
to one task, which is what the ledger's ``dispute`` needs. An edge whose output differs from
the majority's is a dissenter; :meth:`RedundantResult.disputes` pairs each dissenter's signed
receipt with a majority receipt for ``LedgerClient.dispute``. Without a strict majority
(e.g. two edges that disagree) nothing is accepted: :class:`DisagreementError` carries all
receipts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from secure_ci.device._session import Input, Output, Session
from secure_ci.device._tasks import TaskReceipt
from secure_ci.exceptions import ConfigError, DisagreementError, SecureCIError

__all__ = ["RedundantResult", "infer_redundant", "outputs_agree"]


def outputs_agree(a: Output, b: Output, *, rtol: float = 1e-3, atol: float = 1e-4) -> bool:
    """Same structure, shapes and dtypes, values within tolerance (tails may batch
    differently). NaNs never agree."""
    xs = a if isinstance(a, tuple) else (a,)
    ys = b if isinstance(b, tuple) else (b,)
    return len(xs) == len(ys) and all(
        x.shape == y.shape
        and x.dtype == y.dtype
        and bool(torch.allclose(x, y, rtol=rtol, atol=atol))
        for x, y in zip(xs, ys, strict=True)
    )


def _agrees(agree: Callable[[Output, Output], bool], a: Output, b: Output) -> bool:
    try:
        return bool(agree(a, b))
    except (RuntimeError, TypeError, ValueError):  # incomparable outputs do not agree
        return False


@dataclass(frozen=True)
class RedundantResult:
    """The majority's output; per session (in order) its receipt, or None where the session
    failed (``failures``); the sessions in the majority and the dissenters."""

    output: Output
    receipts: tuple[TaskReceipt | None, ...]
    majority: tuple[int, ...]
    dissenters: tuple[int, ...]
    failures: dict[int, SecureCIError]

    def disputes(self) -> list[tuple[TaskReceipt, TaskReceipt]]:
        """(majority receipt, dissenting receipt) for each dissenter: dispute evidence."""
        witness = self.receipts[self.majority[0]]
        pairs = [(witness, self.receipts[i]) for i in self.dissenters]
        return [(a, b) for a, b in pairs if a is not None and b is not None]


async def infer_redundant(
    sessions: Sequence[Session],
    x: Input,
    *,
    agree: Callable[[Output, Output], bool] = outputs_agree,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> RedundantResult:
    """Run ``x`` on every session's edge; the output a strict majority agrees on.

    The sessions must be of one device with one plan (model, cut, codec) and to distinct
    enclaves. A session that fails (a timeout, an error frame) casts no vote but still
    counts: a strict majority of *all* sessions must agree, else DisagreementError (with
    every receipt received).
    """
    if len(sessions) < 2:
        raise ConfigError("redundant inference needs at least two sessions")
    first = sessions[0]
    if any(s.plan != first.plan or s.identity != first.identity for s in sessions):
        raise ConfigError("redundant sessions must share the device identity and the plan")
    if len({s.binding.address for s in sessions}) != len(sessions):
        raise ConfigError("redundant sessions must be to distinct enclaves")
    payload = await asyncio.to_thread(first.encode_input, x)
    salt = random_bytes(32)
    answers = await asyncio.gather(
        *(s.infer_encoded(payload, salt=salt) for s in sessions), return_exceptions=True
    )
    failures: dict[int, SecureCIError] = {}
    votes: dict[int, tuple[Output, TaskReceipt]] = {}
    for i, answer in enumerate(answers):
        if isinstance(answer, SecureCIError):  # no answer is not a vote
            failures[i] = answer
        elif isinstance(answer, BaseException):
            raise answer
        else:
            votes[i] = answer
    groups: list[list[int]] = []
    for i, (output, _) in votes.items():
        for group in groups:
            if _agrees(agree, votes[group[0]][0], output):
                group.append(i)
                break
        else:
            groups.append([i])
    receipts = tuple(votes[i][1] if i in votes else None for i in range(len(sessions)))
    largest = max(groups, key=len, default=[])
    if 2 * len(largest) <= len(sessions):
        raise DisagreementError(
            f"{len(sessions)} edges: {len(votes)} answered in {len(groups)} different ways,"
            f" {len(failures)} failed; no majority",
            tuple(r for r in receipts if r is not None),
        )
    dissenters = tuple(sorted(i for group in groups if group is not largest for i in group))
    return RedundantResult(votes[largest[0]][0], receipts, tuple(largest), dissenters, failures)
