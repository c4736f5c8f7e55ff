"""The fail-over benchmark's device process: killed with SIGKILL mid-run, started again.

``python benchmarks/_failover_device.py --package P --samples S --journal J --edges A,B,C
--indices 0,1,... [--resume]`` opens a fleet device (``open_device``) with a write-ahead
journal at ``J`` and runs the samples at ``--indices`` (of the float32 stack in ``S``,
written by ``encode_features``) as a paced stream. With ``--resume`` it first finishes what
the journal shows begun and unfinished (``Device.resume``). It reports on stdout, one JSON
object a line: ``begun`` (key and digest of the inputs, printed by the journal right after
they are on disk), ``ready``, ``resumed`` (one per finished leftover), ``resumed_all``,
``done`` (one per task of the stream, with its output), ``finished``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from secure_ci.device import DeviceIdentity, TaskOutcome, open_device
from secure_ci.device._journal import DeviceJournal
from secure_ci.package import load_package
from secure_ci.partition._codec import decode_features
from secure_ci.testing import DEV_NOW
from secure_ci.testing._edge_process import dev_fleet_policy

KEY = bytes.fromhex("5b" * 32)


def say(**fields: Any) -> None:
    fields["t"] = time.time()
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:24]


class AnnouncingJournal(DeviceJournal):
    """A journal that says which inputs it wrote ahead, once they are on disk."""

    def begin(self, inputs: bytes, *rest: Any) -> int:
        key = super().begin(inputs, *rest)
        say(event="begun", key=key, digest=digest(inputs))
        return key


def _report(event: str, outcome: TaskOutcome, **extra: Any) -> None:
    output = outcome.output
    tensor = output if isinstance(output, torch.Tensor) else output[0]
    say(
        event=event, key=outcome.key, mode=outcome.mode, latency_ms=outcome.latency_ms,
        attempts=[[a.edge, a.outcome, a.ms] for a in outcome.attempts],
        output=[float(v) for v in tensor.flatten()], **extra,
    )  # fmt: skip


async def _run(args: argparse.Namespace) -> None:
    package = load_package(args.package)
    stack = decode_features(args.samples.read_bytes())[0]
    indices = [int(i) for i in args.indices.split(",") if i]
    policy, pki = dev_fleet_policy()
    with AnnouncingJournal.open(args.journal) as journal:
        async with open_device(
            [e for e in args.edges.split(",") if e], package=package,
            identity=DeviceIdentity(KEY), policy=policy, collateral=pki.collateral,
            journal=journal, clock=lambda: float(DEV_NOW), slowdown=args.slowdown,
            deadline_ms=args.deadline_ms, attempt_cap=args.attempt_cap, edge_only=False,
            early_exits=False, connect_timeout=10.0,
        ) as device:  # fmt: skip
            await device.wait_ready(timeout=30.0)
            say(event="ready", healthy=len(device.healthy()))
            if args.resume:
                resumed = await device.resume()
                for outcome in resumed:
                    _report("resumed", outcome)
                say(event="resumed_all", count=len(resumed))
            window = asyncio.Semaphore(args.window)
            start = time.monotonic()

            async def one(index: int) -> None:
                try:
                    outcome = await device.run(stack[index : index + 1].clone())
                finally:
                    window.release()
                _report("done", outcome, index=index)

            async with asyncio.TaskGroup() as group:
                for n, index in enumerate(indices):
                    await asyncio.sleep(max(0.0, start + n / args.rate - time.monotonic()))
                    await window.acquire()
                    group.create_task(one(index))
    say(event="finished")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--edges", default="")
    parser.add_argument("--indices", default="")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--slowdown", type=float, default=100.0)
    parser.add_argument("--deadline-ms", type=float, default=1000.0)
    parser.add_argument("--attempt-cap", type=float, default=2.0)
    parser.add_argument("--resume", action="store_true")
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
