"""The whole system on one machine (``secure-ci demo``): ledger, attested edge, devices, audit,
and the planner's story (a stepping link, a killed edge, every task audited).

Importing this package imports torch and web3 (it composes everything).
"""

from __future__ import annotations

from secure_ci.demo._story import StoryConfig, run_story, story_package
from secure_ci.demo._story_plot import plot_story
from secure_ci.demo._system import EDGE_ONLY_CUT, SystemDemoConfig, run_system_demo

__all__ = [
    "EDGE_ONLY_CUT",
    "StoryConfig",
    "SystemDemoConfig",
    "plot_story",
    "run_story",
    "run_system_demo",
    "story_package",
]
