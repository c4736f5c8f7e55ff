"""Redundant inference: one task to k attested edges, accepted only when a majority agrees.

The head runs once; the same encoded features go to every session with the same salt, so
every edge sees the same input commitment and (default) task id: the k results are answers
to one task, which is what the ledger's ``dispute`` needs. An edge whose output differs from
the majority's is a dissenter; :meth:`RedundantResult.disputes` gives the receipts (with the
openings of their output commitments) for one k-way ``LedgerClient.dispute``, where the
contract compares the results' canonical outputs. Without a strict majority (e.g. two edges
that disagree) nothing is accepted: :class:`DisagreementError` carries all receipts.
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

__all__ = ["MAX_DISPUTE_RESULTS", "RedundantResult", "infer_redundant", "outputs_agree"]

MAX_DISPUTE_RESULTS = 8
"""The most results one ledger dispute compares (the contract's MAX_RESULTS)."""


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

    def disputes(self) -> tuple[TaskReceipt, ...]:
        """The evidence of one k-way dispute: every opened receipt (at most
        :data:`MAX_DISPUTE_RESULTS`, dissenters first, then enough of the majority to stay
        a strict majority), or () when their canonical digests all agree (outputs within
        tolerance, or that differ below the model's canonical rule: the chain would refuse
        them as ``SameOutput``)."""
        opened = {
            i: r for i, r in enumerate(self.receipts) if r is not None and r.opening is not None
        }
        dissent = [i for i in self.dissenters if i in opened][: (MAX_DISPUTE_RESULTS - 1) // 2]
        chosen = dissent + [i for i in self.majority if i in opened]
        evidence = tuple(opened[i] for i in sorted(chosen[:MAX_DISPUTE_RESULTS]))
        digests = {r.opening.canonical for r in evidence if r.opening is not None}
        return evidence if len(digests) > 1 else ()


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
