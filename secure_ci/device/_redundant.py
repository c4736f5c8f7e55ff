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

from secure_ci.device._session import Output, Session
from secure_ci.device._tasks import TaskReceipt
from secure_ci.exceptions import ConfigError, DisagreementError

__all__ = ["RedundantResult", "infer_redundant", "outputs_agree"]


def outputs_agree(a: Output, b: Output, *, rtol: float = 1e-3, atol: float = 1e-4) -> bool:
    """Same structure and shapes, values within tolerance (tails may batch differently)."""
    xs = a if isinstance(a, tuple) else (a,)
    ys = b if isinstance(b, tuple) else (b,)
    return len(xs) == len(ys) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=rtol, atol=atol)
        for x, y in zip(xs, ys, strict=True)
    )


@dataclass(frozen=True)
class RedundantResult:
    """The majority's output, every edge's receipt (session order) and the dissenters."""

    output: Output
    receipts: tuple[TaskReceipt, ...]
    dissenters: tuple[int, ...]
    majority: tuple[int, ...]

    def disputes(self) -> list[tuple[TaskReceipt, TaskReceipt]]:
        """(majority receipt, dissenting receipt) for each dissenter: dispute evidence."""
        witness = self.receipts[self.majority[0]]
        return [(witness, self.receipts[i]) for i in self.dissenters]


async def infer_redundant(
    sessions: Sequence[Session],
    x: torch.Tensor,
    *,
    agree: Callable[[Output, Output], bool] = outputs_agree,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> RedundantResult:
    """Run ``x`` on every session's edge; the output a strict majority agrees on.

    The sessions must be of one device with one plan (model, cut, codec) and to distinct
    enclaves. Raises DisagreementError without a strict majority; errors of a session (a
    timeout, an error frame) propagate, since a missing answer is not a vote.
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
    answers = await asyncio.gather(*(s.infer_encoded(payload, salt=salt) for s in sessions))
    outputs = [output for output, _ in answers]
    receipts = tuple(receipt for _, receipt in answers)
    groups: list[list[int]] = []
    for i, output in enumerate(outputs):
        for group in groups:
            if agree(outputs[group[0]], output):
                group.append(i)
                break
        else:
            groups.append([i])
    largest = max(groups, key=len)
    if 2 * len(largest) <= len(sessions):
        raise DisagreementError(
            f"{len(sessions)} edges returned {len(groups)} different results, no majority",
            receipts,
        )
    dissenters = tuple(sorted(i for group in groups if group is not largest for i in group))
    return RedundantResult(outputs[largest[0]], receipts, dissenters, tuple(largest))
