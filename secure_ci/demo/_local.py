"""Head -> codec -> tail in one process: what each feature codec and the early exit cost.

The network-free part of the demo: the trained digits CNN split at a cut, run on the held-out
set for several codecs (and with an early exit), to compare bytes, accuracy and latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from secure_ci.exceptions import ConfigError, SecureCIError
from secure_ci.partition._guard import running

if TYPE_CHECKING:
    from secure_ci.zoo._train import TrainedDigits

__all__ = ["DEFAULT_CUT", "DEMO_CODECS", "EXIT_MODE", "ModeResult", "run_split_demo"]

DEMO_CODECS = ("float32", "float16", "int8", "int4", "int8+zstd", "int4+zstd")
EXIT_MODE = "int8+exit"
EXIT_THRESHOLD = 0.99
DEFAULT_CUT = "pool1"


@dataclass(frozen=True)
class ModeResult:
    """One way of running the split: codec (and exit), its latency, bytes and accuracy."""

    mode: str
    tasks: int
    failed: int
    latency_ms_p50: float
    bytes_per_task: float
    accuracy: float
    exit_rate: float


def run_split_demo(
    trained: TrainedDigits,
    *,
    cut_name: str = DEFAULT_CUT,
    modes: Sequence[str] = (*DEMO_CODECS, EXIT_MODE),
    tasks: int = 200,
    devices: int = 1,
) -> dict[str, Any]:
    """Run ``tasks`` single-image tasks per mode, round-robin over ``devices``; a summary.

    A mode is a codec name, or ``<codec>+exit``: the device stops at the exit head when it is
    confident (max softmax >= ``EXIT_THRESHOLD``) and sends nothing.
    """
    import torch

    from secure_ci.partition import ExitPolicy, decode_features, encode_features, should_exit

    if tasks < 1 or devices < 1:
        raise ConfigError("--tasks and --devices must be at least 1")
    cuts = {cut.name: cut for cut in trained.partitioner.cuts}
    if cut_name not in cuts:
        raise ConfigError(f"unknown cut {cut_name!r}; cuts: {', '.join(cuts)}")
    cut = cuts[cut_name]
    head, tail = trained.partitioner.split(cut)
    exit_head = trained.exit_heads.get(cut.index)
    x, y = trained.data.test_x, trained.data.test_y
    results = []
    for mode in modes:
        use_exit = mode.endswith("+exit")
        codec = mode.removesuffix("+exit")
        if use_exit and exit_head is None:
            raise ConfigError(f"no exit head at cut {cut_name!r}")
        policy = ExitPolicy(cut=cut.index, metric="max_softmax", threshold=EXIT_THRESHOLD)
        latencies, sizes, correct, failed, exits = [], [], 0, 0, 0
        with running(), torch.no_grad():  # warm-up, untimed: first calls allocate and dispatch
            tail(*decode_features(encode_features(head(x[:1]), codec)))
        for task in range(tasks):
            sample = x[task % len(x)].unsqueeze(0)
            start = time.perf_counter()
            try:
                with running(), torch.no_grad():
                    boundary = head(sample)
                    logits = exit_head(*boundary) if use_exit and exit_head else None
                    if logits is not None and bool(should_exit(logits, policy)[0]):
                        exits += 1
                        sizes.append(0)
                    else:
                        payload = encode_features(boundary, codec)
                        sizes.append(len(payload))
                        logits = tail(*decode_features(payload, expected=cut.boundary))
            except SecureCIError:
                failed += 1
                continue
            latencies.append(1000 * (time.perf_counter() - start))
            correct += int(int(logits.argmax(dim=1)[0]) == int(y[task % len(y)]))
        done = tasks - failed
        results.append(
            ModeResult(
                mode=mode,
                tasks=done,
                failed=failed,
                latency_ms_p50=round(statistics.median(latencies), 4) if latencies else 0.0,
                bytes_per_task=round(sum(sizes) / len(sizes), 1) if sizes else 0.0,
                accuracy=round(correct / done, 4) if done else 0.0,
                exit_rate=round(exits / done, 4) if done else 0.0,
            )
        )
    return {
        "tasks_completed": sum(r.tasks for r in results),
        "tasks_failed": sum(r.failed for r in results),
        "devices": devices,
        "tasks_per_device": -(-tasks // devices),
        "model": "digits_cnn",
        "model_test_accuracy": round(trained.accuracy, 4),
        "cut": cut.name,
        "float32_bytes": cut.nbytes,
        "modes": [asdict(r) for r in results],
    }
