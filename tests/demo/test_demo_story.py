"""The planner story's pieces that need no network: its configuration, heads, switches, plot.

The story itself (edges, shaped links, the kill, the audit) runs in tests/cli/test_demo.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from secure_ci.demo import StoryConfig, plot_story, story_package
from secure_ci.demo._story import _head_cuts, _switches
from secure_ci.exceptions import ConfigError
from secure_ci.package import load_package
from secure_ci.zoo._train import load_trained_digits

# Shared with tests/zoo/test_digits.py so the full training runs once per machine.
SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"


@pytest.mark.parametrize(
    "options",
    [
        {"phases": ()},
        {"phases": ((0.0, 1.0),)},
        {"phases": ((1.0, -1.0),)},
        {"slowdown": 0.5},
        {"kill_at": 1.0},
        {"fps": 0.0},
        {"delay_ms": -1.0},
    ],
)
def test_story_config_refuses_nonsense(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        StoryConfig(workdir=Path("w"), package=Path("p"), **options)


def test_the_package_is_cached_and_the_heads_end_at_the_named_cut() -> None:
    trained = load_trained_digits(SHARED_CACHE)
    path = story_package(trained, SHARED_CACHE)
    assert story_package(trained, SHARED_CACHE) == path  # the second time from the cache
    package = load_package(path)
    names = [c.name for c in package.cuts]
    heads = _head_cuts(package, "pool1")
    assert heads
    assert max(heads) == names.index("pool1")
    with pytest.raises(ConfigError, match="unknown cut"):
        _head_cuts(package, "nope")


def _frame(t: float, config: str, **extra: Any) -> dict[str, Any]:
    entry = {"t": t, "mbps": 20.0, "config": config, "edge": "edge-a", "latency_ms": 10.0}
    return {"failovers": 0, **entry, **extra}


def test_switches_are_changes_of_configuration_not_of_edge() -> None:
    trace = [
        _frame(0.0, "edge-only float32"),
        _frame(0.1, "edge-only float32", edge="edge-b"),
        _frame(0.2, "pool1 int8", mbps=0.1),
        _frame(0.3, "pool1 int8"),
        _frame(0.4, "edge-only float32"),
    ]
    assert _switches(trace) == [
        {"t": 0.2, "mbps": 0.1, "from": "edge-only float32", "to": "pool1 int8"},
        {"t": 0.4, "mbps": 20.0, "from": "pool1 int8", "to": "edge-only float32"},
    ]


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    planner = [_frame(0.0, "edge-only float32"), _frame(1.0, "pool1 int8", failovers=1)]
    story = {
        "trace": {"planner": planner, "fixed_split": [_frame(0.5, "pool1 int8")]},
        "link_mbps": [20.0, 0.1],
        "phase_seconds": [1.0, 1.0],
        "killed": {"edge": "edge-a", "t": 0.9, "mid_task": True},
        "slowdown": 100.0,
        "rtt_ms": 4.0,
        "plan_switches": 1,
        "failovers": 1,
        "tasks_lost": 0,
    }
    path = tmp_path / "plots" / "story.png"
    plot_story(story, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
