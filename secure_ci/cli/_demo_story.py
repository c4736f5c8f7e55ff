"""How `secure-ci demo` reports the planner story: a table per phase, switches, the kill."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["print_story"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _uses(run: dict[str, Any]) -> str:
    return ", ".join(f"{label} x{n}" for label, n in run["configurations"].items())


def print_story(console: Console, story: dict[str, Any], plot: str | None) -> None:
    """The story's table and summary lines (``run_story``'s summary)."""
    phases = [f"{m:g} Mbit/s" for m in story["link_mbps"]]
    table = Table(
        title=(
            f"planner story: a {story['slowdown']:g}x slower camera, RTT "
            f"{story['rtt_ms']:g} ms, two edges (p50 latency per link phase, ms)"
        )
    )
    for i, column in enumerate(["camera", "frames", *phases, "configurations"]):
        table.add_column(column, justify="left" if i in (0, len(phases) + 2) else "right")
    for name, key in (("planner", "planner"), ("fixed split", "fixed_split")):
        run = story[key]
        per_phase = [_ms(p["latency_ms_p50"]) for p in run["phases"]]
        table.add_row(name, str(run["tasks"]), *per_phase, _uses(run))
    console.print(table)
    for s in story["switches"][:12]:
        console.print(f"  t={s['t']:5.2f} s at {s['mbps']:g} Mbit/s: {s['from']} -> {s['to']}")
    if len(story["switches"]) > 12:
        console.print(f"  ... {len(story['switches']) - 12} more")
    killed = story["killed"]
    if killed is not None:
        when = "with a request at it" if killed["mid_task"] else "between requests"
        console.print(
            f"{killed['edge']} killed at t={killed['t']:.2f} s {when}: "
            f"{story['failed_over_tasks']} frames failed over ({story['failovers']} failed "
            f"attempts), {story['tasks_lost']} lost"
        )
    audit = story["audit"]
    console.print(
        f"story ledger {audit['contract']}: {audit['tasks_anchored']} tasks anchored in "
        f"{audit['batches']} batches by 2 edges, {audit['tasks_verified']} verified by the "
        f"auditor ({audit['findings']} findings); {audit['receipts_audited']} of "
        f"{audit['receipts']} results the cameras accepted found among them"
    )
    moved = audit["reassignments"]
    console.print(
        f"reassignments on the ledger: {moved['reassigned_attempts']} attempts the camera sent "
        f"to an edge and took elsewhere; {moved['anchored_by_first_edge']} anchored by that "
        f"edge, {moved['request_challenged']} challenged on chain with the signed request, "
        f"{moved['invisible']} invisible"
    )
    if plot is not None:
        console.print(f"plot of the story: {plot}")
