"""The trained digits CNN and its model package, built once per process (and the training
once per machine, in a shared cache): what tests and benchmarks of whole systems run."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from secure_ci.zoo._train import TrainedDigits

__all__ = ["DIGITS_CACHE", "DIGITS_CALIBRATION", "digits_package", "trained_digits"]

DIGITS_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"
"""Where the trained weights are kept, so the training runs once per machine."""
DIGITS_CALIBRATION = 64
"""Held-out samples the package is calibrated (and its exit heads trained) on."""


@functools.cache
def trained_digits() -> TrainedDigits:
    from secure_ci.zoo._train import load_trained_digits

    return load_trained_digits(DIGITS_CACHE)


@functools.cache
def digits_package() -> bytes:
    """The trained digits CNN, packed with the first 64 held-out samples as calibration."""
    from secure_ci.package import pack_bytes
    from secure_ci.zoo._digits import DIGITS_INPUT_SHAPE

    model = trained_digits()
    n = DIGITS_CALIBRATION
    return pack_bytes(
        model.model,
        architecture="digits_cnn",
        input_shape=DIGITS_INPUT_SHAPE,
        calibration=(model.data.test_x[:n], model.data.test_y[:n]),
        calibration_source=f"first {n} held-out digits",
        repeats=1,
    )
