"""The digits CNN: data, deterministic training, the accuracy target, the weights cache."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from secure_ci.zoo import get
from secure_ci.zoo._digits import DIGITS_INPUT_SHAPE, digits_cnn
from secure_ci.zoo._train import (
    DigitsData,
    TrainConfig,
    load_digits_data,
    load_trained_digits,
    train_digits,
)

# Shared with tests/cli/test_demo.py so the full training runs once per machine.
SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"
TINY = TrainConfig(epochs=1, exit_epochs=2)


def test_architecture_and_registry() -> None:
    entry = get("digits_cnn")
    assert entry.input_shape == DIGITS_INPUT_SHAPE
    logits = entry.build()(torch.zeros(DIGITS_INPUT_SHAPE))
    assert logits.shape == (1, 10)
    assert isinstance(digits_cnn(), torch.nn.Module)


def test_data_is_upscaled_normalised_and_stratified() -> None:
    data = load_digits_data()
    assert data.train_x.shape[1:] == DIGITS_INPUT_SHAPE[1:]
    assert data.train_x.shape[0] + data.test_x.shape[0] == 1797
    assert data.test_x.shape[0] == 540
    assert float(data.train_x.min()) >= -1.0
    assert float(data.train_x.max()) <= 1.0
    assert torch.bincount(data.test_y).min() >= 50
    again = load_digits_data()
    assert torch.equal(again.test_y, data.test_y)


def test_training_is_deterministic() -> None:
    full = load_digits_data()
    data = DigitsData(full.train_x[:160], full.train_y[:160], full.test_x, full.test_y)
    first = train_digits(data, TINY).state_dict()
    second = train_digits(data, TINY).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_trained_model_reaches_the_accuracy_target() -> None:
    trained = load_trained_digits(SHARED_CACHE)
    assert trained.accuracy >= 0.97
    assert set(trained.exit_heads) == {
        c.index for c in trained.partitioner.cuts if c.name in ("pool1", "relu2")
    }


def test_cache_round_trip_and_corruption(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    trained = load_trained_digits(tmp_path, config=TINY, progress=lambda d, t: calls.append((d, t)))
    assert not trained.from_cache
    assert calls == [(1, 1)]
    (cache_file,) = tmp_path.glob("digits_cnn-*.pt")
    cached = load_trained_digits(tmp_path, config=TINY)
    assert cached.from_cache
    assert cached.accuracy == trained.accuracy
    for index, head in trained.exit_heads.items():
        assert torch.equal(head.linear.weight, cached.exit_heads[index].linear.weight)
    cache_file.write_bytes(b"not a checkpoint")
    retrained = load_trained_digits(tmp_path, config=TINY)
    assert not retrained.from_cache
    assert retrained.accuracy == trained.accuracy
    assert load_trained_digits(tmp_path, config=TINY).from_cache
