"""The whole system on one machine (``secure-ci demo``): ledger, attested edge, devices, audit.

Importing this package imports torch and web3 (it composes everything).
"""

from __future__ import annotations

from secure_ci.demo._system import EDGE_ONLY_CUT, SystemDemoConfig, run_system_demo

__all__ = ["EDGE_ONLY_CUT", "SystemDemoConfig", "run_system_demo"]
