"""The device tests' shared fixtures: the trained digits CNN as a model package file."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_ci.package import ModelPackage, load_package
from secure_ci.testing._digits import digits_package


@pytest.fixture(scope="module")
def package_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("device") / "digits.scipkg"
    path.write_bytes(digits_package())
    return path


@pytest.fixture(scope="module")
def package(package_path: Path) -> ModelPackage:
    return load_package(package_path)
