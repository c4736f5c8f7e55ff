"""Public fakes and fixtures for testing code that uses secure-ci (and for secure-ci's tests)."""

from __future__ import annotations

__all__: list[str] = []
