"""The planner story's figure: latency and chosen configuration against time, both devices.

Top: each frame's latency (log scale) for the planner and for the fixed split, the link's
rate shaded behind them, the edge kill and the failed-over frames marked. Bottom: the
configuration each frame ran with (edge-only, or the cut and codec of a split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_story"]


def plot_story(story: dict[str, Any], path: Path) -> None:
    """Write the figure of ``run_story``'s summary (with its ``trace``) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planner, fixed = story["trace"]["planner"], story["trace"]["fixed_split"]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    start = 0.0
    for mbps, seconds in zip(story["link_mbps"], story["phase_seconds"], strict=True):
        shade = "#f3f3f3" if mbps >= max(story["link_mbps"]) else "#ffe9d6"
        for axis in (top, bottom):
            axis.axvspan(start, start + seconds, color=shade, zorder=0)
        top.text(start + seconds / 2, 1.0, f"{mbps:g} Mbit/s", ha="center", va="bottom",
                 transform=top.get_xaxis_transform(), fontsize=9)  # fmt: skip
        start += seconds
    for trace, name, colour in ((fixed, "fixed split", "#999999"), (planner, "planner", "C0")):
        done = [e for e in trace if e["latency_ms"] is not None]
        label = f"{name} (p50 {_p50(done):.0f} ms)"
        top.plot([e["t"] for e in done], [e["latency_ms"] for e in done], ".-", ms=3, lw=0.8,
                 color=colour, label=label)  # fmt: skip
    moved = [e for e in planner if e["failovers"]]
    if moved:
        top.plot([e["t"] for e in moved], [e["latency_ms"] for e in moved], "x", color="C3",
                 ms=9, mew=2, label=f"failed over ({len(moved)})")  # fmt: skip
    killed = story.get("killed")
    if killed and killed.get("t") is not None:
        for axis in (top, bottom):
            axis.axvline(killed["t"], color="C3", lw=1.2, ls="--")
        top.annotate(f"{killed['edge']} killed", (killed["t"], 0.93), color="C3",
                     xycoords=("data", "axes fraction"), ha="right", fontsize=9)  # fmt: skip
    top.set_yscale("log")
    top.set_ylabel("latency per frame (ms)")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(
        f"digits CNN on a {story['slowdown']:g}x slower camera, RTT {story['rtt_ms']:g} ms: "
        f"{story['plan_switches']} plan switches, {story['failovers']} fail-overs, "
        f"{story['tasks_lost']} lost",
        fontsize=10,
        pad=16,  # above the link's rates
    )
    labels = sorted({e["config"] for e in planner + fixed}, key=_order)
    rows = {label: k for k, label in enumerate(labels)}
    for trace, name, colour, marker, size in (
        (fixed, "fixed split", "#999999", "s", 14),
        (planner, "planner", "C0", "o", 10),
    ):
        for edge, face in (("edge-a", colour), ("edge-b", "none")):
            picked = [e for e in trace if e["edge"] == edge]
            if picked:
                bottom.scatter([e["t"] for e in picked], [rows[e["config"]] for e in picked],
                               s=size, marker=marker, facecolors=face, edgecolors=colour,
                               label=f"{name} at {edge}")  # fmt: skip
    bottom.set_yticks(range(len(labels)), labels)
    bottom.set_ylim(-0.6, len(labels) - 0.4)
    bottom.set_ylabel("configuration")
    bottom.set_xlabel("time since the stream started (s)")
    bottom.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _p50(entries: list[dict[str, Any]]) -> float:
    values = sorted(e["latency_ms"] for e in entries)
    return values[len(values) // 2] if values else float("nan")


def _order(label: str) -> tuple[int, str]:
    return (0 if label.startswith("edge-only") else 1, label)
