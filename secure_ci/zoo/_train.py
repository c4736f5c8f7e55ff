"""Training the digits CNN and its exit heads: seconds on two cores, fixed seed, deterministic.

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 images, no download), upscaled to
32x32 (bilinear), scaled to [-1, 1], split 70/30 stratified with a fixed seed. The trained
weights are cached in a directory the caller chooses (the CLI picks it); a missing, corrupt
or mismatching cache file is simply retrained.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secure_ci.exceptions import PartitionError
from secure_ci.partition._exits import ExitHead, train_exit_heads
from secure_ci.partition._guard import running
from secure_ci.partition._partitioner import Partitioner
from secure_ci.zoo._digits import DIGITS_CLASSES, DIGITS_INPUT_SHAPE, digits_cnn

__all__ = [
    "DigitsData",
    "TrainConfig",
    "TrainedDigits",
    "accuracy",
    "deterministic",
    "load_digits_data",
    "load_trained_digits",
    "train_digits",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each training epoch."""

EXIT_CUT_NAMES = ("pool1", "relu2")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (part of the cache key)."""

    seed: int = 0
    epochs: int = 12
    batch_size: int = 64
    lr: float = 8e-3
    shift: int = 2
    test_size: float = 0.3
    exit_epochs: int = 40
    threads: int = 1

    @property
    def tag(self) -> str:
        text = f"digits-v1|{self}|{torch.__version__}".encode()
        return hashlib.sha256(text).hexdigest()[:16]


@dataclass(frozen=True)
class DigitsData:
    """Train and held-out test tensors: images (N, 1, 32, 32) float32, labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass(frozen=True)
class TrainedDigits:
    """The trained model, its partitioner, exit heads by cut index, data and test accuracy."""

    model: nn.Module
    partitioner: Partitioner
    exit_heads: dict[int, ExitHead]
    data: DigitsData
    accuracy: float
    from_cache: bool


@contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic, ``threads``-threaded torch; global state restored afterwards."""
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(old_deterministic)
            torch.set_num_threads(old_threads)


def load_digits_data(*, test_size: float = 0.3, seed: int = 0) -> DigitsData:
    """The bundled digits, upscaled to 32x32, with a stratified held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    size = DIGITS_INPUT_SHAPE[2:]
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False) * 2 - 1
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=test_size, stratify=bunch.target, random_state=seed
    )
    train, test = torch.tensor(train_idx), torch.tensor(test_idx)
    return DigitsData(images[train], labels[train], images[test], labels[test])


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: Any) -> float:
    """Top-1 accuracy (0..1) of ``predict`` (returning logits) on ``x``, ``y``."""
    with running(), torch.no_grad():
        return float((predict(x).argmax(dim=1) == y).float().mean())


def train_digits(
    data: DigitsData, config: TrainConfig = TrainConfig(), progress: Progress | None = None
) -> nn.Module:
    """Train the digits CNN with Adam on the training split; deterministic for a config."""
    with deterministic(config.seed, config.threads):
        model = digits_cnn()
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        count = data.train_x.shape[0]
        steps = -(-count // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps
        )
        generator = torch.Generator().manual_seed(config.seed)
        model.train()
        for epoch in range(config.epochs):
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, config.batch_size):
                batch = order[start : start + config.batch_size]
                images = _shifted(data.train_x[batch], config.shift, generator)
                with running():  # per step: a trace on another thread waits one step at most
                    loss = F.cross_entropy(model(images), data.train_y[batch])
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
            if progress is not None:
                progress(epoch + 1, config.epochs)
    return model.eval()


def _shifted(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by up to ``shift`` pixels (background fill): augmentation."""
    if shift == 0:
        return images
    count, _, height, width = images.shape
    padded = F.pad(images, (shift,) * 4, value=float(images.min()))
    dy = torch.randint(0, 2 * shift + 1, (count, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (count, 1, 1), generator=generator)
    rows = dy + torch.arange(height).view(1, height, 1)
    cols = dx + torch.arange(width).view(1, 1, width)
    return padded[torch.arange(count).view(count, 1, 1), 0, rows, cols].unsqueeze(1)


def _exit_cuts(partitioner: Partitioner) -> list[int]:
    by_name = {cut.name: cut.index for cut in partitioner.cuts}
    missing = [name for name in EXIT_CUT_NAMES if name not in by_name]
    if missing:
        raise PartitionError(f"digits CNN has no cut named {missing}")
    return [by_name[name] for name in EXIT_CUT_NAMES]


def _build(model: nn.Module) -> Partitioner:
    return Partitioner(model, (torch.zeros(DIGITS_INPUT_SHAPE),))


def load_trained_digits(
    cache_dir: Path | None,
    *,
    config: TrainConfig = TrainConfig(),
    progress: Progress | None = None,
) -> TrainedDigits:
    """The trained digits CNN with exit heads; loaded from ``cache_dir`` or trained and cached.

    ``cache_dir=None`` always trains and writes nothing.
    """
    data = load_digits_data(test_size=config.test_size, seed=config.seed)
    path = cache_dir / f"digits_cnn-{config.tag}.pt" if cache_dir is not None else None
    cached = _load_cache(path) if path is not None else None
    if cached is not None:
        model, partitioner, exit_heads = cached
        from_cache = True
    else:
        model = train_digits(data, config, progress)
        partitioner = _build(model)
        with deterministic(config.seed, config.threads):
            exit_heads = train_exit_heads(
                model,
                partitioner,
                _exit_cuts(partitioner),
                (data.train_x, data.train_y),
                epochs=config.exit_epochs,
                seed=config.seed,
                num_classes=DIGITS_CLASSES,
            )
        if path is not None:
            _save_cache(path, model, exit_heads)
        from_cache = False
    score = accuracy(model, data.test_x, data.test_y)
    return TrainedDigits(model, partitioner, exit_heads, data, score, from_cache)


def _save_cache(path: Path, model: nn.Module, exit_heads: dict[int, ExitHead]) -> None:
    payload = {
        "model": model.state_dict(),
        "exits": {str(index): head.state_dict() for index, head in exit_heads.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_cache(path: Path) -> tuple[nn.Module, Partitioner, dict[int, ExitHead]] | None:
    """The cached model and exit heads, or None when the file is missing or unusable."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        model = digits_cnn()
        model.load_state_dict(payload["model"])
        model.eval()
        partitioner = _build(model)
        exit_heads = {}
        for index in _exit_cuts(partitioner):
            head = ExitHead(partitioner.cuts[index].boundary, DIGITS_CLASSES)
            head.load_state_dict(payload["exits"][str(index)])
            exit_heads[index] = head.eval()
    except Exception as exc:  # a cache is disposable: anything wrong with it means retrain
        logger.warning("ignoring unusable digits cache %s: %s", path, exc)
        return None
    return model, partitioner, exit_heads
