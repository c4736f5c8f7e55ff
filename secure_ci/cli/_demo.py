"""`secure-ci demo`: the whole system on one machine, on embedded defaults.

For now: the trained digits CNN (trained once, then cached), split at a cut, run as
device head -> feature codec -> edge tail on the held-out digits, for several codecs and
with an early exit. Later issues put TLS, attestation and the ledger between head and tail;
:func:`run_split_demo` is the core and stays free of printing and files.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from secure_ci.cli._app import app
from secure_ci.exceptions import ConfigError, SecureCIError

if TYPE_CHECKING:
    from secure_ci.zoo._train import TrainedDigits

DEMO_CODECS = ("float32", "float16", "int8", "int4", "int8+zstd", "int4+zstd")
EXIT_MODE = "int8+exit"
EXIT_THRESHOLD = 0.99
DEFAULT_CUT = "pool1"


def default_cache_dir() -> Path:
    """Where the CLI (and the benchmarks) cache trained weights: ``./.secure-ci/cache``."""
    return Path.cwd() / ".secure-ci" / "cache"


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
        with torch.no_grad():  # warm-up, untimed: first calls allocate and dispatch
            tail(*decode_features(encode_features(head(x[:1]), codec)))
        for task in range(tasks):
            sample = x[task % len(x)].unsqueeze(0)
            start = time.perf_counter()
            try:
                with torch.no_grad():
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


def _table(summary: dict[str, Any]) -> Table:
    table = Table(
        title=f"digits CNN split at {summary['cut']} (float32 {summary['float32_bytes']} B)"
    )
    for column in ("cut", "mode", "bytes/task", "accuracy", "latency p50 ms", "exit rate"):
        table.add_column(column, justify="left" if column in ("cut", "mode") else "right")
    for mode in summary["modes"]:
        table.add_row(
            summary["cut"],
            mode["mode"],
            f"{mode['bytes_per_task']:.0f}",
            f"{100 * mode['accuracy']:.2f} %",
            f"{mode['latency_ms_p50']:.3f}",
            f"{100 * mode['exit_rate']:.1f} %",
        )
    return table


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="Number of simulated devices.")] = 1,
    tasks: Annotated[int, typer.Option(help="Tasks (single images) per mode.")] = 200,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write a JSON summary to this path.")
    ] = None,
    cut: Annotated[str, typer.Option(help="Where to split the digits CNN.")] = DEFAULT_CUT,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Weights cache (default ./.secure-ci/cache).")
    ] = None,
) -> None:
    """Train (or load) the digits CNN, split it, run head -> codec -> tail; print a table."""
    import torch

    from secure_ci.zoo._train import load_trained_digits

    torch.set_num_threads(1)  # a device runs one inference at a time; steadier latencies
    console = Console()
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("digits CNN (training or loading)", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total, description="training digits CNN")

        trained = load_trained_digits(cache_dir or default_cache_dir(), progress=advance)
    summary = run_split_demo(trained, cut_name=cut, tasks=tasks, devices=devices)
    console.print(_table(summary))
    console.print(
        f"held-out accuracy {100 * trained.accuracy:.2f} % "
        f"({'cached' if trained.from_cache else 'trained now'}); "
        f"{summary['tasks_completed']} tasks completed, {summary['tasks_failed']} failed"
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
