"""Exit heads in a package: trained and calibrated when packing, verified when loading.

Training and calibration never share a sample. With a separate training set (``training``:
for the zoo's digits CNN, the split the backbone was trained on) the heads are fitted on it
and calibrated on the whole calibration set. Without one, the calibration set is split by
position: samples at even positions (0, 2, 4, ...) train the heads, samples at odd positions
calibrate them. Training is seeded and runs with a fixed thread count, so the same inputs
give the same heads, bit for bit, on one machine.

For each head and each threshold, on the held-out samples: ``p_exit`` is the fraction whose
exit is confident enough (:func:`~secure_ci.partition.should_exit`), and the accuracy drop
is the full model's top-1 accuracy minus the accuracy when those samples take the exit
head's prediction and the rest the full model's, in percentage points.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from secure_ci.exceptions import ConfigError, PackageError, PartitionError
from secure_ci.package._calibrate import Progress, _batched, _chunks, _logits
from secure_ci.package._exit_manifest import (
    MAX_EXIT_HEADS,
    ExitHeadInfo,
    ExitRow,
    ExitTable,
    ExitTraining,
    exit_features,
    exit_tensor_names,
)
from secure_ci.package._manifest import Calibration
from secure_ci.package._weights import decode_weights, encode_weights
from secure_ci.partition._exits import ExitHead, should_exit, train_exit_heads
from secure_ci.partition._guard import running
from secure_ci.partition._partitioner import Partitioner
from secure_ci.partition._plan import Cut, ExitPolicy
from secure_ci.partition._profiler import median_ms as _median_ms

__all__ = [
    "DEFAULT_EXIT_THRESHOLDS",
    "EXIT_POOL",
    "build_exit_head",
    "check_exit_options",
    "default_exit_cuts",
    "fit_exits",
    "model_classes",
    "verify_exit_heads",
]

DEFAULT_EXIT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
EXIT_POOL = 4
DEFAULT_EXIT_SHARES = (0.25, 0.5)
Labelled = tuple[torch.Tensor, torch.Tensor]


def _eligible(partitioner: Partitioner, cut: Cut) -> bool:
    """Whether an exit head fits the cut: float boundaries of rank 2-4, batched along dim 0."""
    try:
        exit_features(cut, EXIT_POOL)
    except PackageError:
        return False
    return _batched(partitioner.input_specs, cut)


def default_exit_cuts(partitioner: Partitioner) -> tuple[int, ...]:
    """Up to two early cuts: for each of 25 % and 50 % of the model's FLOPs, the latest cut
    that can hold an exit head and whose head costs at most that share."""
    chosen: list[int] = []
    for share in DEFAULT_EXIT_SHARES:
        fits = [c.index for c in partitioner.cuts
                if c.head_flops_share <= share and _eligible(partitioner, c)]  # fmt: skip
        if fits and fits[-1] not in chosen:
            chosen.append(fits[-1])
    return tuple(chosen)


def _check_cuts(partitioner: Partitioner, cuts: Sequence[int]) -> tuple[int, ...]:
    if len(cuts) > MAX_EXIT_HEADS or len(set(cuts)) != len(cuts):
        raise ConfigError(f"exit cuts must be at most {MAX_EXIT_HEADS} distinct cut indices")
    for cut in cuts:
        if isinstance(cut, bool) or not isinstance(cut, int):
            raise ConfigError(f"exit cut {cut!r} is not a cut index")
        if not 0 <= cut < len(partitioner.cuts):
            raise ConfigError(
                f"exit cut {cut} is not one of the model's cuts 0..{len(partitioner.cuts) - 1}"
            )
        if not _eligible(partitioner, partitioner.cuts[cut]):
            raise ConfigError(f"no exit head fits cut {cut}: its boundary is not float "
                              "tensors of rank 2-4 batched along dimension 0")  # fmt: skip
    return tuple(sorted(cuts))


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = []
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
            raise ConfigError(f"exit thresholds must be max-softmax values in [0, 1], got {t!r}")
        values.append(float(t))
    if not values or len(values) > 64 or len(set(values)) != len(values):
        raise ConfigError("exit thresholds must be 1..64 distinct values")
    return tuple(sorted(values))


@contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _boundary(partitioner: Partitioner, cut: Cut, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    head, _ = partitioner.split(cut)
    parts = [head(chunk) for chunk in _chunks(x)]
    if isinstance(parts[0], tuple | list):
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return (torch.cat(parts),)


def _rows(
    exit_logits: torch.Tensor,
    full: torch.Tensor,
    labels: torch.Tensor,
    cut: int,
    thresholds: tuple[float, ...],
) -> tuple[ExitRow, ...]:
    exit_prediction = exit_logits.argmax(dim=1)
    baseline = float((full == labels).float().mean())
    rows = []
    for threshold in thresholds:
        leave = should_exit(exit_logits, ExitPolicy(cut, "max_softmax", threshold))
        combined = torch.where(leave, exit_prediction, full)
        accuracy = float((combined == labels).float().mean())
        p_exit = float(leave.float().mean())
        rows.append(ExitRow("max_softmax", threshold, round(p_exit, 6),
                            round(100.0 * (baseline - accuracy), 3)))  # fmt: skip
    return tuple(rows)


def check_exit_options(
    partitioner: Partitioner,
    cuts: Sequence[int],
    thresholds: Sequence[float],
    seed: int,
    training: Labelled | None,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The exit cuts and thresholds, sorted, after checking every exit option (a
    :class:`ConfigError` names the first bad one), before anything is measured."""
    chosen = _check_cuts(partitioner, cuts)
    grid = _check_thresholds(thresholds)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 62:
        raise ConfigError(f"exit seed must be a non-negative integer, got {seed!r}")
    if training is not None:
        _check_training(training, partitioner.example_inputs[0])
    return chosen, grid


def fit_exits(
    partitioner: Partitioner,
    cuts: Sequence[int],
    calibration: Labelled,
    calibration_source: str,
    training: Labelled | None = None,
    training_source: str = "exit training set",
    *,
    thresholds: Sequence[float] = DEFAULT_EXIT_THRESHOLDS,
    seed: int = 0,
    repeats: int = 3,
    threads: int = 1,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[ExitTable, bytes]:
    """Train, calibrate and time exit heads at ``cuts`` (see the module docstring); returns
    the manifest's exits table and the exit heads section."""
    chosen, grid = check_exit_options(partitioner, cuts, thresholds, seed, training)
    x, y = calibration
    if training is None:
        if x.shape[0] < 2:
            raise ConfigError("exit heads need at least 2 calibration samples to split")
        training = (x[0::2], y[0::2])
        training_source = f"even positions of {calibration_source}"[:256]
        calibration_source = f"odd positions of {calibration_source}"[:256]
        x, y = x[1::2], y[1::2]
    tx, ty = _check_training(training, x)
    model = partitioner.model
    with running(), _threads(threads), torch.no_grad():
        full_logits = torch.cat([_logits(model(chunk)) for chunk in _chunks(x)])
    classes = int(full_logits.shape[1])
    if classes < 2 or int(y.max()) >= classes or int(ty.max()) >= classes:
        raise ConfigError(f"exit heads need labels in 0..{classes - 1} of a classifier")
    with _threads(threads):
        try:
            heads = train_exit_heads(model, partitioner, chosen, (tx, ty), seed=seed,
                                     pool=EXIT_POOL, num_classes=classes)  # fmt: skip
        except PartitionError as exc:
            raise ConfigError(f"exit heads cannot be trained: {exc}") from None
    full = full_logits.argmax(dim=1)
    infos, tensors = [], {}
    for done, index in enumerate(chosen):
        if progress is not None:
            progress("exit heads", done, len(chosen))
        cut, head = partitioner.cuts[index], heads[index]
        with running(), _threads(threads), torch.no_grad():
            boundary = _boundary(partitioner, cut, x)
            exit_logits = head(*boundary)
            one = tuple(t[:1] for t in boundary)
            head_ms = _median_ms(functools.partial(head, *one), repeats, clock)
        infos.append(ExitHeadInfo(index, EXIT_POOL, classes, head_ms,
                                  _rows(exit_logits, full, y, index, grid)))  # fmt: skip
        weight, bias = exit_tensor_names(index)
        tensors[weight], tensors[bias] = head.linear.weight, head.linear.bias
    if progress is not None:
        progress("exit heads", len(chosen), len(chosen))
    section = encode_weights(tensors)
    accuracy = round(float((full == y).float().mean()), 6)
    table = ExitTable(
        sha256=hashlib.sha256(section).hexdigest(),
        nbytes=len(section),
        training=ExitTraining(training_source, int(tx.shape[0]), seed),
        calibration=Calibration(calibration_source, int(x.shape[0]), accuracy),
        heads=tuple(infos),
    )
    return table, section


def _check_training(training: object, x: torch.Tensor) -> Labelled:
    if not isinstance(training, tuple) or len(training) != 2:
        raise ConfigError("exit training data must be a pair (inputs, labels) of tensors")
    tx, ty = training
    if not isinstance(tx, torch.Tensor) or not isinstance(ty, torch.Tensor):
        raise ConfigError("exit training data must be a pair (inputs, labels) of tensors")
    if tx.dtype != torch.float32 or tx.shape[1:] != x.shape[1:] or tx.shape[0] == 0:
        raise ConfigError("exit training inputs must be float32 samples shaped like the model's")
    if ty.dim() != 1 or ty.shape[0] != tx.shape[0] or ty.dtype != torch.int64 or ty.min() < 0:
        raise ConfigError("exit training labels must be int64 of shape (N,) matching the inputs")
    return tx.detach(), ty.detach()


def verify_exit_heads(
    table: ExitTable | None, section: bytes, cuts: tuple[Cut, ...], classes: int | None
) -> dict[int, dict[str, torch.Tensor]]:
    """The exit heads' state dicts by cut, after checking the section against ``table`` (digest,
    exact tensor names, dtypes, shapes from the cuts' boundaries, finite values) and the
    heads' classes against the model's (``classes``, None when the model is no classifier)."""
    if table is None:
        if section:
            raise PackageError("the package has an exit heads section its manifest omits")
        return {}
    if len(section) != table.nbytes or hashlib.sha256(section).hexdigest() != table.sha256:
        raise PackageError("the exit heads do not match the digest in the manifest")
    tensors = decode_weights(section)
    expected = {name for head in table.heads for name in exit_tensor_names(head.cut)}
    if set(tensors) != expected:
        raise PackageError("the exit heads section holds other tensors than the manifest names")
    heads = {}
    for info in table.heads:
        if info.classes != classes:
            raise PackageError(f"exit head at cut {info.cut} has {info.classes} classes, "
                               f"the model {classes}")  # fmt: skip
        features = exit_features(cuts[info.cut], info.pool)
        weight, bias = (tensors[name] for name in exit_tensor_names(info.cut))
        for tensor, shape in ((weight, (info.classes, features)), (bias, (info.classes,))):
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != shape:
                got = f"{tensor.dtype} {tuple(tensor.shape)}"
                raise PackageError(f"exit head at cut {info.cut}: {got}, not float32 {shape}")
            if not bool(torch.isfinite(tensor).all()):
                raise PackageError(f"exit head at cut {info.cut} has non-finite weights")
        heads[info.cut] = {"linear.weight": weight, "linear.bias": bias}
    return heads


def build_exit_head(cut: Cut, info: ExitHeadInfo, state: Mapping[str, torch.Tensor]) -> ExitHead:
    """A fresh exit head holding ``state``, in eval mode; the global RNG is left untouched."""
    try:
        with torch.random.fork_rng(devices=[]):
            head = ExitHead(cut.boundary, info.classes, pool=info.pool)
    except PartitionError as exc:
        raise PackageError(f"exit head at cut {cut.index}: {exc}") from None
    head.load_state_dict({name: t.clone() for name, t in state.items()}, strict=True)
    return head.eval()


def model_classes(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """The number of classes of a classifier (output (1, K)), or None for any other output."""
    with running(), torch.no_grad():
        out = model(torch.zeros(input_shape))
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1:
        return int(out.shape[1])
    return None
