"""The device client library: run the head, send features to an attested edge, get results.

A device over several edges plans every task and fails over (:func:`open_device`); given the
ledger's deployment it finds the edges in the on-chain registry, checks each against it and
the release registry, and reconciles its journal with the chain in the background::

    async with open_device(deployment, package=package, identity=identity, policy=policy,
                           collateral=collateral, journal=journal) as device:
        y = await device.infer(x)
        ys = await device.infer_many(frames)

One session with one edge, split and codec fixed (:func:`open_session`)::

    async with open_session("edge:7443", policy=policy, collateral=collateral,
                            identity=identity, model=model, plan=plan,
                            example_input=x0) as session:
        y = await session.infer(x)
        ys = await session.infer_many(frames, max_in_flight=8)
    session.receipts  # every signed request/result pair, for the ledger

    result = await infer_redundant([s1, s2, s3], x)   # one task, three edges, majority
    result.disputes()  # the opened receipts of one k-way dispute for the ledger
"""

from __future__ import annotations

from secure_ci.device._breaker import Breaker, BreakerState
from secure_ci.device._connect import open_session
from secure_ci.device._fleet import Device
from secure_ci.device._identity import DeviceIdentity
from secure_ci.device._open import open_device
from secure_ci.device._outcome import Attempt, TaskOutcome
from secure_ci.device._redundant import RedundantResult, infer_redundant, outputs_agree
from secure_ci.device._session import DEFAULT_DOMAIN, Input, Output, Session, parse_edge_address
from secure_ci.device._sync import SyncDevice, open_device_sync
from secure_ci.device._tasks import EnclaveBinding, TaskReceipt, sign_request, verify_result

__all__ = [
    "DEFAULT_DOMAIN",
    "Attempt",
    "Breaker",
    "BreakerState",
    "Device",
    "DeviceIdentity",
    "EnclaveBinding",
    "Input",
    "Output",
    "RedundantResult",
    "Session",
    "SyncDevice",
    "TaskOutcome",
    "TaskReceipt",
    "infer_redundant",
    "open_device",
    "open_device_sync",
    "open_session",
    "outputs_agree",
    "parse_edge_address",
    "sign_request",
    "verify_result",
]
