"""Split-engine benchmark: codec sizes, accuracy and speed, early exits, analysis time.

Accuracy comes from the trained digits CNN on its held-out split: every boundary is encoded
one task (one image) at a time, as a device would send it, decoded and fed to the tail.
Other zoo models are untrained, so their rows carry bytes and speed only (accuracy null).
``device_compute_saved`` is the share of the model's FLOPs a device running the model
locally skips thanks to the exit (exit-head cost included); the exit threshold is chosen on
the training split (drop <= 0.5 pt there), then measured on the held-out split.
``codec_speed`` times encode + decode of a 784 KiB frame-sized tensor (and a size sweep)
against memcpy of the same tensor, on one core (see ``_codec_speed``); the per-task rows'
``encode_decode_ms_per_mb`` are per-image tensors of a few KiB, where call overhead dominates.
Targets (ARCHITECTURE.md): int8 <= 0.26, int4 <= 0.14 bytes ratio on cuts >= 4 KiB; drop
int8 <= 0.3 pt, int4 <= 1.5 pt; exit <= 1 pt drop saving >= 30 %; ResNet-18 analysis <= 2 s;
codecs >= 1 GB/s.
Sizes: ``full``; ``quick`` (fewer codecs and cuts); ``smoke`` (a slice of the digits data, two
thresholds, one speed shape: every part runs, for the smoke test).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _codec_speed import FRAME, SPEED_CODECS, TARGET_GB_S, codec_speeds
from _common import timed

from secure_ci.cli._demo import default_cache_dir
from secure_ci.partition import CODECS, ExitPolicy, Partitioner, decode_features, encode_features
from secure_ci.partition._exits import exit_confidence, should_exit
from secure_ci.zoo import get, names
from secure_ci.zoo._train import TrainedDigits, load_trained_digits

QUICK_CODECS = ("float16", "int8", "int4", "int8+zstd", "int4+zstd")
OTHER_CODECS = ("float16", "int8", "int4", "int8+zstd", "int4+lz4")
THRESHOLDS = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
SWEEP = ((1, 64, 28, 28), FRAME, (1, 64, 112, 112), (8, 64, 56, 56))
COLORS = {"float32": "tab:gray", "float16": "tab:blue", "int8": "tab:orange", "int4": "tab:green"}


@dataclass(frozen=True)
class Size:
    codecs: tuple[str, ...]
    images: int | None  # digits images per split (None: all)
    thresholds: tuple[float, ...]
    other_cuts: int
    other_samples: int
    speed_shapes: tuple[tuple[int, ...], ...]
    speed_repeats: int


SIZES = {
    "smoke": Size(("float16", "int8", "int4", "int8+zstd"), 64, (0.9, 0.99), 1, 1, (FRAME,), 5),
    "quick": Size(QUICK_CODECS, None, THRESHOLDS, 1, 3, SWEEP[:3], 20),
    "full": Size(CODECS, None, THRESHOLDS, 3, 10, SWEEP, 100),
}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def _codec_row(
    model: str,
    cut: Any,
    codec: str,
    samples: list[tuple[torch.Tensor, ...]],
    tail: torch.nn.Module | None,
    labels: torch.Tensor | None,
    baseline: float | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    encoded = [encode_features(s, codec) for s in samples]
    decoded = [decode_features(e, expected=cut.boundary) for e in encoded]
    elapsed = time.perf_counter() - start
    megabytes = cut.nbytes * len(samples) / 2**20
    drop = None
    if tail is not None and labels is not None and baseline is not None:
        batch = tuple(torch.cat(parts) for parts in zip(*decoded, strict=True))
        with torch.no_grad():
            drop = round(100 * (baseline - _accuracy(tail(*batch), labels)), 3)
    return {
        "model": model,
        "cut": cut.name,
        "codec": codec,
        "float32_bytes": cut.nbytes,
        "bytes_ratio": round(sum(map(len, encoded)) / len(encoded) / cut.nbytes, 4),
        "accuracy_drop_pt": drop,
        "encode_decode_ms_per_mb": round(1000 * elapsed / megabytes, 3),
    }


def _per_task(boundary: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    count = boundary[0].shape[0]
    return [tuple(t[i : i + 1] for t in boundary) for i in range(count)]


def _digits_rows(trained: TrainedDigits, size: Size) -> list[dict[str, Any]]:
    x, y = trained.data.test_x[: size.images], trained.data.test_y[: size.images]
    codecs = size.codecs
    with torch.no_grad():
        baseline = _accuracy(trained.model(x), y)
    rows = []
    for cut in trained.partitioner.cuts:
        head, tail = trained.partitioner.split(cut)
        with torch.no_grad():
            samples = _per_task(head(x))
        rows += [_codec_row("digits_cnn", cut, c, samples, tail, y, baseline) for c in codecs]
    return rows


def _other_rows(size: Size) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: list[dict[str, Any]] = []
    analysis: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for name in names():
        entry = get(name)
        model = entry.build().eval()
        example = (torch.randn(entry.input_shape, generator=generator),)
        partitioner, seconds = timed(functools.partial(Partitioner, model, example))
        analysis[name] = round(seconds, 4)
        if name == "digits_cnn":
            continue
        cuts = partitioner.cuts
        picks = sorted({len(cuts) // 4, len(cuts) // 2, 3 * len(cuts) // 4})
        for index in picks[: size.other_cuts]:
            head, _ = partitioner.split(cuts[index])
            with torch.no_grad():
                boundary = head(*example)
            if not all(t.is_floating_point() for t in boundary):
                continue
            samples = [tuple(boundary)] * size.other_samples
            rows += [
                _codec_row(name, cuts[index], c, samples, None, None, None) for c in OTHER_CODECS
            ]
    return rows, analysis


def _exit_outcome(
    trained: TrainedDigits, cut: int, threshold: float, x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    exit_head = trained.exit_heads[cut]
    head, _ = trained.partitioner.split(cut)
    with torch.no_grad():
        full = trained.model(x)
        early = exit_head(*head(x))
    policy = ExitPolicy(cut=cut, metric="max_softmax", threshold=threshold)
    mask = should_exit(early, policy)
    combined = torch.where(mask.unsqueeze(1), early, full)
    rate = float(mask.float().mean())
    share = trained.partitioner.cuts[cut].head_flops_share
    overhead = exit_head.flops / max(trained.partitioner.total_flops, 1)
    return {
        "exit_rate": round(rate, 4),
        "accuracy_drop_pt": round(100 * (_accuracy(full, y) - _accuracy(combined, y)), 3),
        "device_compute_saved": round(rate * (1 - share) - overhead, 4),
    }


def _early_exit(trained: TrainedDigits, size: Size) -> dict[str, Any]:
    data, n = trained.data, size.images
    train_x, train_y, test_x, test_y = (
        data.train_x[:n],
        data.train_y[:n],
        data.test_x[:n],
        data.test_y[:n],
    )
    best: tuple[float, int, float] | None = None
    for cut in sorted(trained.exit_heads):
        for threshold in size.thresholds:
            seen = _exit_outcome(trained, cut, threshold, train_x, train_y)
            if seen["accuracy_drop_pt"] <= 0.5 and (
                best is None or seen["device_compute_saved"] > best[0]
            ):
                best = (seen["device_compute_saved"], cut, threshold)
    if best is None:
        return {"threshold": None, "accuracy_drop_pt": None, "device_compute_saved": 0.0}
    _, cut, threshold = best
    held_out = _exit_outcome(trained, cut, threshold, test_x, test_y)
    with torch.no_grad():
        head, _ = trained.partitioner.split(cut)
        logits = trained.exit_heads[cut](*head(test_x))
    confidence = exit_confidence(logits, "max_softmax")
    return {
        "threshold": threshold,
        "metric": "max_softmax",
        "cut": trained.partitioner.cuts[cut].name,
        "mean_confidence": round(float(confidence.mean()), 4),
        **held_out,
    }


def run(*, quick: bool, size: str | None = None) -> dict[str, Any]:
    """Measure everything at ``size`` (``smoke``, ``quick``, ``full``; default from ``quick``)."""
    name = size or ("quick" if quick else "full")
    chosen = SIZES[name]
    torch.set_num_threads(1)
    trained = load_trained_digits(default_cache_dir())
    rows = _digits_rows(trained, chosen)
    other, analysis = _other_rows(chosen)
    return {
        "codecs": rows + other,
        "codec_speed": codec_speeds(chosen.speed_shapes, chosen.speed_repeats),
        "early_exit": _early_exit(trained, chosen),
        "analysis_seconds": analysis,
        "digits_test_accuracy": round(trained.accuracy, 4),
        "digits_images": len(trained.data.test_x[: chosen.images]),
        "size": name,
        "quick": name != "full",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Bytes ratio and accuracy drop per digits cut (a line per codec), and codec throughput
    against memcpy over tensor sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["codecs"] if r["model"] == "digits_cnn" and "+" not in r["codec"]]
    cuts = list(dict.fromkeys(r["cut"] for r in rows))
    figure = plt.figure(figsize=(9, 11))
    top, middle, bottom = (figure.add_subplot(3, 1, i) for i in (1, 2, 3))
    for codec in dict.fromkeys(r["codec"] for r in rows):
        mine = {r["cut"]: r for r in rows if r["codec"] == codec}
        style = {"marker": "o", "label": codec, "color": COLORS.get(codec)}
        top.plot(cuts, [mine[c]["bytes_ratio"] for c in cuts], **style)
        middle.plot(cuts, [mine[c]["accuracy_drop_pt"] for c in cuts], **style)
    top.set_ylabel("encoded / float32 bytes")
    top.set_title("Feature codecs on the trained digits CNN")
    top.legend()
    middle.set_ylabel("accuracy drop (pt)")
    middle.set_xlabel("cut (digits CNN)")
    _plot_speed(bottom, result["codec_speed"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_speed(axes: Any, speed: dict[str, Any]) -> None:
    sweep = speed["sweep"]
    sizes = [s["float32_bytes"] / 2**20 for s in sweep]
    axes.plot(sizes, [s["memcpy_gb_s"] for s in sweep], "k--", marker="s", label="memcpy")
    for codec in SPEED_CODECS:
        rates = [s["codecs"][codec]["gb_s"] for s in sweep]
        axes.plot(sizes, rates, marker="o", color=COLORS[codec], label=f"{codec} encode + decode")
    axes.axhline(TARGET_GB_S, color="red", linewidth=0.8, linestyle=":", label="target 1 GB/s")
    from matplotlib.ticker import FuncFormatter, LogLocator

    axes.set_xscale("log")
    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    axes.set_xlabel("float32 tensor size (MiB)")
    axes.set_ylabel("GB/s of float32, one core (median)")
    axes.set_title("Codec throughput vs memcpy of the same tensor")
    axes.legend(fontsize=8)
