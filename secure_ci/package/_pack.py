"""Packing a model: analyse it, profile it, measure the codecs, seal it in one file."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import secure_ci
from secure_ci.exceptions import ConfigError
from secure_ci.package._calibrate import (
    DEFAULT_CODECS,
    Progress,
    _check_calibration,
    measure_codecs,
)
from secure_ci.package._exit_heads import (
    DEFAULT_EXIT_THRESHOLDS,
    check_exit_options,
    default_exit_cuts,
    fit_exits,
)
from secure_ci.package._format import encode_container
from secure_ci.package._manifest import MAX_INPUT_ELEMENTS, Calibration, PackageManifest
from secure_ci.package._package import ModelPackage, build_zoo_model, read_package
from secure_ci.package._weights import encode_weights
from secure_ci.partition._canonical import CanonicalRule, default_canonical
from secure_ci.partition._guard import running
from secure_ci.partition._partitioner import Partitioner
from secure_ci.partition._profiler import profile
from secure_ci.partition._trace import outputs_match

__all__ = ["pack_bytes", "pack_model"]


def _check_shape(input_shape: object) -> tuple[int, ...]:
    if (
        not isinstance(input_shape, tuple)
        or not 1 <= len(input_shape) <= 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    ):
        raise ConfigError(f"input_shape must be 1 to 8 positive integers, got {input_shape!r}")
    if input_shape[0] != 1 or math.prod(input_shape) > MAX_INPUT_ELEMENTS:
        raise ConfigError(f"input_shape {input_shape} must be one sample (1, ...) of bounded size")
    return input_shape


def _rebuild(model: nn.Module, architecture: str, input_shape: tuple[int, ...]) -> nn.Module:
    """The zoo architecture with ``model``'s weights, checked to compute what ``model`` does."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = {name: t.detach() for name, t in model.state_dict().items()}
    rebuilt = build_zoo_model(architecture, state, error=ConfigError)
    example = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    training = model.training
    try:
        model.eval()
        with running(), torch.no_grad():
            same = outputs_match(model(example), rebuilt(example))
    except Exception as exc:  # the caller's own forward: translate anything
        raise ConfigError(f"model fails on an input of shape {input_shape}: {exc}") from exc
    finally:
        model.train(training)
    if not same:
        raise ConfigError(f"the model does not compute what zoo architecture {architecture} does")
    return rebuilt


def _canonical_rule(model: nn.Module, shape: tuple[int, ...]) -> CanonicalRule:
    """The default rule for ``model``'s outputs on one sample."""
    with running(), torch.no_grad():
        out = model(torch.zeros(shape))
    tensors = out if isinstance(out, tuple | list) else (out,)
    return default_canonical([tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor)])


def pack_bytes(
    model: nn.Module,
    *,
    architecture: str,
    input_shape: tuple[int, ...],
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    calibration_source: str = "calibration set",
    codecs: Sequence[str] = DEFAULT_CODECS,
    repeats: int = 3,
    threads: int = 1,
    progress: Progress | None = None,
    exits: Sequence[int] | None = None,
    exit_training: tuple[torch.Tensor, torch.Tensor] | None = None,
    exit_training_source: str = "exit training set",
    exit_thresholds: Sequence[float] = DEFAULT_EXIT_THRESHOLDS,
    exit_seed: int = 0,
    canonical: CanonicalRule | None = None,
) -> bytes:
    """The bytes of a package of ``model`` (see :func:`pack_model`); writes nothing."""
    shape = _check_shape(input_shape)
    if progress is not None:
        progress("analysis", 0, 1)
    rebuilt = _rebuild(model, architecture, shape)
    weights = encode_weights(rebuilt.state_dict())
    partitioner = Partitioner(rebuilt, (torch.zeros(shape),))
    exit_cuts = _exit_cuts(partitioner, exits, calibration is not None)
    if exit_cuts:
        check_exit_options(partitioner, exit_cuts, exit_thresholds, exit_seed, exit_training)
    table = measure_codecs(partitioner, calibration, shape, codecs, progress)
    if progress is not None:
        progress("profile", 0, 1)
    measured = profile(partitioner, repeats=repeats, threads=threads)
    exit_table, exit_section = None, b""
    cx, cy = _check_calibration(calibration, shape)
    if exit_cuts and cy is not None:
        exit_table, exit_section = fit_exits(
            partitioner,
            exit_cuts,
            (cx, cy),
            calibration_source,
            exit_training,
            exit_training_source,
            thresholds=exit_thresholds,
            seed=exit_seed,
            repeats=repeats,
            threads=threads,
            progress=progress,
        )
    calibration_info = None
    if calibration is not None and table.accuracy is not None:
        samples = int(calibration[0].shape[0])
        calibration_info = Calibration(calibration_source, samples, round(table.accuracy, 6))
    manifest = PackageManifest(
        architecture=architecture,
        input_shape=shape,
        model_id=partitioner.model_id,
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        weights_bytes=len(weights),
        weights_tensors=len(rebuilt.state_dict()),
        weights_parameters=sum(p.numel() for p in rebuilt.parameters()),
        total_flops=partitioner.total_flops,
        total_params=partitioner.total_params,
        cuts=partitioner.cuts,
        profiles=(measured,),
        codec_inputs="random" if calibration_info is None else "calibration",
        calibration=calibration_info,
        codecs=table.rows,
        created_with={"secure_ci": secure_ci.__version__, "torch": torch.__version__},
        exits=exit_table,
        canonical=_canonical_rule(rebuilt, shape) if canonical is None else canonical,
    )
    manifest.check()
    if progress is not None:
        progress("profile", 1, 1)
    return encode_container(manifest.to_json(), weights, exit_section)


def _exit_cuts(
    partitioner: Partitioner, exits: Sequence[int] | None, calibrated: bool
) -> tuple[int, ...]:
    if exits is None:
        return default_exit_cuts(partitioner) if calibrated else ()
    if not isinstance(exits, list | tuple | range):
        raise ConfigError(f"exits must be a sequence of cut indices, got {exits!r:.40}")
    if exits and not calibrated:
        raise ConfigError("exit heads need a calibration set (inputs, labels) to be calibrated")
    return tuple(exits)


def pack_model(
    model: nn.Module,
    *,
    architecture: str,
    input_shape: tuple[int, ...],
    out: Path,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    calibration_source: str = "calibration set",
    codecs: Sequence[str] = DEFAULT_CODECS,
    repeats: int = 3,
    threads: int = 1,
    progress: Progress | None = None,
    exits: Sequence[int] | None = None,
    exit_training: tuple[torch.Tensor, torch.Tensor] | None = None,
    exit_training_source: str = "exit training set",
    exit_thresholds: Sequence[float] = DEFAULT_EXIT_THRESHOLDS,
    exit_seed: int = 0,
    canonical: CanonicalRule | None = None,
) -> ModelPackage:
    """Pack ``model`` (an instance of zoo ``architecture``) into the file ``out``.

    The package holds the weights (safetensors), the cut analysis for ``input_shape`` (one
    sample, batch dimension first), a latency profile (``repeats`` timed runs per cut with
    ``threads`` threads) and the codec table, with the accuracy drop measured on
    ``calibration`` (inputs, int64 labels) when given. The file is written atomically and
    read back through :func:`load_package`'s checks before it is returned.

    Exit heads (early exits) are trained at the cuts ``exits`` (default: up to two early
    cuts, and only with a calibration set; ``()`` for none) on ``exit_training`` when given,
    otherwise on the even positions of the calibration set; they are calibrated on the
    calibration set's remaining samples, one row per max-softmax threshold in
    ``exit_thresholds`` (see :mod:`secure_ci.package._exit_heads`).

    ``canonical`` is the model's canonical output rule, which disputes compare (default:
    :func:`~secure_ci.partition.default_canonical` of the model's output shapes: top-1
    for a classifier).
    """
    data = pack_bytes(
        model,
        architecture=architecture,
        input_shape=input_shape,
        calibration=calibration,
        calibration_source=calibration_source,
        codecs=codecs,
        repeats=repeats,
        threads=threads,
        progress=progress,
        exits=exits,
        exit_training=exit_training,
        exit_training_source=exit_training_source,
        exit_thresholds=exit_thresholds,
        exit_seed=exit_seed,
        canonical=canonical,
    )
    package = read_package(data)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write model package {out}: {exc.strerror or exc}") from None
    return package
