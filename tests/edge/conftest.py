"""Edge test fixtures (defined in ``edge_helpers``, a uniquely named module)."""

from __future__ import annotations

from edge_helpers import served

__all__ = ["served"]
