"""`secure-ci demo`: the whole system on one machine, on embedded defaults."""

from __future__ import annotations

from secure_ci.cli._app import app

_ = app
