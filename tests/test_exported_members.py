"""Every subpackage re-exports a curated ``__all__``, and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import secure_ci

SUBPACKAGES = sorted(
    m.name for m in pkgutil.iter_modules(secure_ci.__path__, "secure_ci.") if m.ispkg
)


@pytest.mark.parametrize("name", ["secure_ci", "secure_ci.exceptions", *SUBPACKAGES])
def test_all_is_curated(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    for member in exported:
        assert hasattr(module, member), f"{name}.__all__ names missing {member!r}"
        assert not member.startswith("_") or member == "__version__"
