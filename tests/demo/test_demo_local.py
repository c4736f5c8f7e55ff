"""The network-free half of the demo: head -> codec -> tail on the held-out digits."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from secure_ci.demo._local import run_split_demo
from secure_ci.exceptions import ConfigError
from secure_ci.zoo._train import load_trained_digits

# Shared with tests/zoo/test_digits.py so the full training runs once per machine.
SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"


def test_demo_core_matches_the_model_on_float32() -> None:
    trained = load_trained_digits(SHARED_CACHE)
    summary = run_split_demo(trained, cut_name="relu2", modes=["float32"], tasks=40)
    (mode,) = summary["modes"]
    with torch.no_grad():
        predictions = trained.model(trained.data.test_x[:40]).argmax(dim=1)
    expected = float((predictions == trained.data.test_y[:40]).float().mean())
    assert mode["accuracy"] == pytest.approx(expected)
    assert mode["bytes_per_task"] > summary["float32_bytes"]


def test_demo_refuses_bad_arguments() -> None:
    trained = load_trained_digits(SHARED_CACHE)
    with pytest.raises(ConfigError, match="unknown cut"):
        run_split_demo(trained, cut_name="nope")
    with pytest.raises(ConfigError, match="at least 1"):
        run_split_demo(trained, tasks=0)
    with pytest.raises(ConfigError, match="no exit head"):
        run_split_demo(trained, cut_name="conv3", modes=["int8+exit"])
