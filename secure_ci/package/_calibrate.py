"""The codec table: bytes on the wire and accuracy drop of every codec at every cut.

Each sample's boundary is encoded on its own, as a device sends it (per-channel quantization
parameters are per sample), decoded against the cut's boundary specs and fed to the tail.
The accuracy drop is the full model's top-1 accuracy on the whole calibration set minus the
accuracy through the codec, in percentage points; a lossless stage (``+zstd``, ``+lz4``)
does not change the decoded values, so such a codec is evaluated once through its base.
Bytes are the mean encoded size over the first ``BYTES_SAMPLES`` samples. Without a
calibration set the bytes are measured on a few seeded standard-normal inputs and the
accuracy is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from secure_ci.exceptions import ConfigError
from secure_ci.package._manifest import CodecRow
from secure_ci.partition._codec import CODECS, decode_features, encode_features
from secure_ci.partition._guard import running
from secure_ci.partition._partitioner import Partitioner
from secure_ci.partition._plan import Cut, TensorSpec
from secure_ci.partition._stage import Stage

__all__ = ["DEFAULT_CODECS", "CodecTable", "Progress", "measure_codecs"]

DEFAULT_CODECS = ("float32", "float16", "int8", "int4", "int8+zstd", "int4+zstd")
RANDOM_SAMPLES = 4
BYTES_SAMPLES = 128
MAX_CALIBRATION = 100_000
CHUNK = 128

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` while a package is built."""

Features = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CodecTable:
    """Codec rows and the baseline accuracy on the calibration set (None without one)."""

    rows: tuple[CodecRow, ...]
    accuracy: float | None


def _check_calibration(
    calibration: tuple[torch.Tensor, torch.Tensor] | None, input_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if calibration is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randn((RANDOM_SAMPLES, *input_shape[1:]), generator=generator), None
    if not isinstance(calibration, tuple) or len(calibration) != 2:
        raise ConfigError("calibration must be a pair (inputs, labels) of tensors")
    x, y = calibration
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigError("calibration must be a pair (inputs, labels) of tensors")
    if x.dtype != torch.float32 or tuple(x.shape[1:]) != input_shape[1:]:
        sample = ", ".join(map(str, input_shape[1:]))
        raise ConfigError(f"calibration inputs must be float32 of shape (N, {sample})")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
        raise ConfigError("calibration labels must be int64 of shape (N,) matching the inputs")
    if not 1 <= x.shape[0] <= MAX_CALIBRATION:
        raise ConfigError(f"calibration set must hold 1..{MAX_CALIBRATION} samples")
    return x.detach(), y.detach()


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    return [x[i : i + CHUNK] for i in range(0, x.shape[0], CHUNK)]


def _batched(inputs: tuple[TensorSpec, ...], cut: Cut) -> bool:
    """Whether head and tail run on many samples at once, stacked along dimension 0."""
    return all(spec.batch_dim == 0 for spec in (*inputs, *cut.boundary))


def _logits(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError("calibration needs a classifier: the model must return (N, classes)")
    return out


def _run(stage: Stage, rows: Sequence[Features], batched: bool) -> list[object]:
    """Run ``stage`` on per-sample argument tuples, batched along dimension 0 if it can."""
    if batched:
        args = tuple(torch.cat(parts, dim=0) for parts in zip(*rows, strict=True))
        return [stage(*args)]
    return [stage(*row) for row in rows]


def _per_sample(out: object) -> list[Features]:
    boundary = out if isinstance(out, tuple) else (out,)
    if not all(isinstance(t, torch.Tensor) for t in boundary):
        raise ConfigError("a head returned something other than tensors")
    count = boundary[0].shape[0]
    return [tuple(t[i : i + 1] for t in boundary) for i in range(count)]


def _correct(outputs: list[object], labels: torch.Tensor) -> int:
    logits = torch.cat([_logits(o) for o in outputs])
    if logits.shape[0] != labels.shape[0]:
        raise ConfigError("calibration needs a classifier: the model must return (N, classes)")
    return int((logits.argmax(dim=1) == labels).sum())


def measure_codecs(
    partitioner: Partitioner,
    calibration: tuple[torch.Tensor, torch.Tensor] | None,
    input_shape: tuple[int, ...],
    codecs: Sequence[str] = DEFAULT_CODECS,
    progress: Progress | None = None,
) -> CodecTable:
    """Measure every codec at every cut of ``partitioner`` (see the module docstring)."""
    unknown = [c for c in codecs if c not in CODECS]
    if unknown or not codecs or len(set(codecs)) != len(codecs):
        raise ConfigError(f"codecs must be distinct names from: {', '.join(CODECS)}")
    x, y = _check_calibration(calibration, input_shape)
    accuracy = None
    with running(), torch.no_grad():
        if y is not None:
            correct = sum(_correct([partitioner.model(c)], yc)
                          for c, yc in zip(_chunks(x), _chunks(y), strict=True))  # fmt: skip
            accuracy = correct / x.shape[0]
        rows: list[CodecRow] = []
        cuts = partitioner.cuts
        for done, cut in enumerate(cuts):
            if progress is not None:
                progress("codec table", done, len(cuts))
            head, tail = partitioner.split(cut)
            batched = _batched(partitioner.input_specs, cut)
            rows.extend(_cut_rows(cut, head, tail, batched, x, y, accuracy, codecs))
    if progress is not None:
        progress("codec table", len(cuts), len(cuts))
    return CodecTable(tuple(rows), accuracy)


def _cut_rows(
    cut: Cut,
    head: Stage,
    tail: Stage,
    batched: bool,
    x: torch.Tensor,
    y: torch.Tensor | None,
    baseline: float | None,
    codecs: Sequence[str],
) -> list[CodecRow]:
    bases = list(dict.fromkeys(codec.partition("+")[0] for codec in codecs))
    sizes = dict.fromkeys(codecs, 0)
    correct = dict.fromkeys(bases, 0)
    measured = 0
    labels = _chunks(y) if y is not None else [None] * len(_chunks(x))
    for chunk, chunk_labels in zip(_chunks(x), labels, strict=True):
        inputs = [(chunk,)] if batched else [(chunk[i : i + 1],) for i in range(chunk.shape[0])]
        samples = [row for out in _run(head, inputs, batched) for row in _per_sample(out)]
        for sample in samples[: max(0, BYTES_SAMPLES - measured)]:
            for codec in codecs:
                sizes[codec] += len(encode_features(sample, codec))
            measured += 1
        if chunk_labels is None:
            continue
        for base in bases:  # a lossless stage does not change what the tail sees
            decoded = [
                decode_features(encode_features(sample, base), expected=cut.boundary)
                for sample in samples
            ]
            correct[base] += _correct(_run(tail, decoded, batched), chunk_labels)
    rows = []
    for codec in codecs:
        mean = sizes[codec] / measured
        drop = None
        if y is not None and baseline is not None:
            accuracy = correct[codec.partition("+")[0]] / x.shape[0]
            drop = round(100.0 * (baseline - accuracy), 3)
        rows.append(
            CodecRow(
                cut=cut.index,
                codec=codec,
                nbytes=round(mean, 1),
                ratio=round(mean / cut.nbytes, 4) if cut.nbytes else 0.0,
                accuracy_drop_pt=drop,
            )
        )
    return rows
