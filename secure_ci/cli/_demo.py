"""`secure-ci demo`: the whole system on one machine, on embedded defaults.

Trains (or loads the cached) digits CNN, compares feature codecs on a local split, then runs
the system: an in-process EVM chain with the SecureCILedger contract, an edge serving the
tail in a simulated enclave over attested TLS 1.3, several devices with registered keys, the
edge's anchorer, the devices' receipts and an audit of every task from the chain's calldata.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from secure_ci.cli._app import app


def default_cache_dir() -> Path:
    """Where the CLI (and the benchmarks) cache trained weights: ``./.secure-ci/cache``."""
    return Path.cwd() / ".secure-ci" / "cache"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _codec_table(local: dict[str, Any]) -> Table:
    rows = [
        [m["mode"], f"{m['bytes_per_task']:.0f}", _pct(m["accuracy"]),
         f"{m['latency_ms_p50']:.3f}", f"{100 * m['exit_rate']:.1f} %"]
        for m in local["modes"]
    ]  # fmt: skip
    title = (
        f"feature codecs, digits CNN split at {local['cut']} (float32 {local['float32_bytes']} B)"
    )
    return _table(title, ["codec", "bytes/task", "accuracy", "p50 ms", "exit rate"], rows)


def _system_table(summary: dict[str, Any]) -> Table:
    rows = [
        [m["mode"], str(m["tasks"]), str(m["failed"]), f"{m['bytes_per_task']:.0f}",
         _pct(m["accuracy"]), "-" if m["latency_ms_p50"] is None else f"{m['latency_ms_p50']:.2f}"]
        for m in summary["modes"]
    ]  # fmt: skip
    title = (
        f"{summary['devices']} devices -> simulated SGX enclave over attested TLS 1.3; "
        f"collaborative = split at {summary['cut']}, {summary['codec']}"
    )
    return _table(title, ["mode", "tasks", "failed", "bytes/task", "accuracy", "p50 ms"], rows)


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="Number of devices (each its own key).")] = 4,
    tasks: Annotated[int, typer.Option(help="Tasks (single images) per mode.")] = 100,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write a JSON summary to this path.")
    ] = None,
    cut: Annotated[str, typer.Option(help="Where to split the digits CNN.")] = "pool1",
    codec: Annotated[str, typer.Option(help="Feature codec of the collaborative mode.")] = "int8",
    rpc: Annotated[
        str | None, typer.Option(help="JSON-RPC URL of a chain (default: in-process EVM).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Weights cache (default ./.secure-ci/cache).")
    ] = None,
    story_seconds: Annotated[
        float, typer.Option(help="Seconds of each link phase of the planner story.")
    ] = 4.0,
    plot: Annotated[
        Path | None,
        typer.Option(help="PNG of the planner story (default ./.secure-ci/demo-story.png)."),
    ] = None,
) -> None:
    """Run the whole system on this machine and print what it did, with an audit summary."""
    import torch

    from secure_ci.cli._demo_story import print_story
    from secure_ci.demo import (
        StoryConfig,
        SystemDemoConfig,
        plot_story,
        run_story,
        run_system_demo,
        story_package,
    )
    from secure_ci.demo._local import run_split_demo
    from secure_ci.zoo._train import load_trained_digits

    torch.set_num_threads(1)  # a device runs one inference at a time; steadier latencies
    # the story kills an edge on purpose: the device's reconnect warnings are reported below
    logging.getLogger("secure_ci").addHandler(logging.NullHandler())
    console = Console()
    with tempfile.TemporaryDirectory(prefix="secure-ci-demo-") as tmp:
        config = SystemDemoConfig(
            workdir=Path(tmp), devices=devices, tasks=tasks, cut=cut, codec=codec, rpc=rpc
        )
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("digits CNN (training or loading)", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(bar, completed=done, total=total, description="training")

            trained = load_trained_digits(cache_dir or default_cache_dir(), progress=advance)
            progress.update(bar, description="comparing feature codecs", total=None)
            local = run_split_demo(trained, cut_name=cut, tasks=min(tasks, 200))

            def step(what: str, done: int, total: int) -> None:
                progress.update(bar, description=what, completed=done, total=total or None)

            summary = asyncio.run(run_system_demo(trained, config, progress=step))
            progress.update(bar, description="packing the digits CNN (once)", total=None)
            package = story_package(trained, cache_dir or default_cache_dir())
            phases = tuple((m, story_seconds) for m, _ in StoryConfig.phases)
            story_config = StoryConfig(workdir=Path(tmp), package=package, phases=phases, rpc=rpc)
            story = asyncio.run(run_story(trained, story_config, progress=lambda w: step(w, 0, 0)))
    plot_path = plot or Path.cwd() / ".secure-ci" / "demo-story.png"
    plot_story(story, plot_path)
    console.print(_codec_table(local))
    console.print(_system_table(summary))
    led = summary["ledger"]
    console.print(
        f"ledger {led['contract']} (chain {led['chain_id']}): {led['tasks_recorded']} tasks "
        f"recorded, {led['tasks_anchored']} anchored in {led['batches']} batches, "
        f"{led['tasks_verified']} verified by the auditor, {led['receipts']} device receipts"
    )
    console.print(
        f"held-out accuracy {_pct(trained.accuracy)} "
        f"({'cached' if trained.from_cache else 'trained now'}); "
        f"{summary['tasks_completed']} tasks completed, {summary['tasks_failed']} failed"
    )
    print_story(console, story, str(plot_path))
    if json_path is not None:
        summary["codecs"] = local["modes"]
        summary["story"] = story
        for key in ("plan_switches", "failovers", "tasks_lost"):
            summary[key] = story[key]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
