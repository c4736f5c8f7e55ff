"""Feature codec speed against memcpy of the same tensor, on one core, in one run.

Each round times, in turn, ``BURST`` back-to-back memcpys of the tensor (``copy_`` into a
preallocated tensor of the same shape) and ``BURST`` encode + decode pairs of every codec, so
a change in the machine's load hits all of them alike, while within a burst the tensor stays
in cache as it is when a device's head has just produced it. ``gb_s`` is float32 bytes /
(encode + decode) with the median wall-clock times; ``cpu_gb_s`` uses this thread's CPU time
instead (what one core does, whatever else the shared machine runs); ``best_gb_s`` the
fastest round's wall clock. ``vs_memcpy`` (and ``cpu_vs_memcpy``) divide by memcpy's rate on
the same clock in the same rounds.
Target (ARCHITECTURE.md): encode + decode >= 1 GB/s of float32 on one core.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import torch

from secure_ci.partition import decode_features, encode_features

FRAME = (1, 64, 56, 56)
"""ResNet-18 after its stem for a 224x224 camera frame: 784 KiB of float32 features."""
SPEED_CODECS = ("float16", "int8", "int4")
TARGET_GB_S = 1.0
BURST = 4


def _rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def codec_speed(shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Encode/decode times and GB/s of each codec and of memcpy for one tensor shape."""
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(shape, generator=generator).relu_()  # post-activation features
    target = torch.empty_like(tensor)
    nbytes = tensor.numel() * tensor.element_size()
    payloads = {codec: encode_features([tensor], codec) for codec in SPEED_CODECS}  # warm-up
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def timed(key: str, fn: Callable[[], object]) -> object:
        start, start_cpu = time.perf_counter(), time.thread_time()
        value = fn()
        cpu.setdefault(key, []).append(time.thread_time() - start_cpu)
        wall.setdefault(key, []).append(time.perf_counter() - start)
        return value

    for _ in range(max(1, repeats)):
        for _ in range(BURST):
            timed("memcpy", lambda: target.copy_(tensor))
        for codec in SPEED_CODECS:
            for _ in range(BURST):
                payloads[codec] = cast(
                    bytes, timed(f"{codec}/encode", lambda c=codec: encode_features([tensor], c))
                )
                timed(f"{codec}/decode", lambda c=codec: decode_features(payloads[c]))
    median = {key: statistics.median(values) for key, values in wall.items()}
    median_cpu = {key: statistics.median(values) for key, values in cpu.items()}
    best = {key: min(values) for key, values in wall.items()}
    memcpy, memcpy_cpu = _rate(nbytes, median["memcpy"]), _rate(nbytes, median_cpu["memcpy"])
    codecs = {}
    for codec in SPEED_CODECS:
        steps = (f"{codec}/encode", f"{codec}/decode")
        rate = _rate(nbytes, sum(median[k] for k in steps))
        cpu_rate = _rate(nbytes, sum(median_cpu[k] for k in steps))
        codecs[codec] = {
            "encode_ms": round(1000 * median[steps[0]], 4),
            "decode_ms": round(1000 * median[steps[1]], 4),
            "gb_s": rate,
            "cpu_gb_s": cpu_rate,
            "best_gb_s": _rate(nbytes, sum(best[k] for k in steps)),
            "vs_memcpy": round(rate / memcpy, 4),
            "cpu_vs_memcpy": round(cpu_rate / memcpy_cpu, 4),
            "bytes_ratio": round(len(payloads[codec]) / nbytes, 4),
        }
    return {
        "shape": list(shape),
        "float32_bytes": nbytes,
        "repeats": max(1, repeats) * BURST,
        "memcpy_gb_s": memcpy,
        "memcpy_cpu_gb_s": memcpy_cpu,
        "memcpy_best_gb_s": _rate(nbytes, best["memcpy"]),
        "codecs": codecs,
    }


def codec_speeds(shapes: tuple[tuple[int, ...], ...], repeats: int) -> dict[str, Any]:
    """The frame-sized measurement as the headline, every shape as a sweep (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep = [codec_speed(shape, repeats) for shape in shapes]
    finally:
        torch.set_num_threads(threads)
    frame = next((s for s in sweep if tuple(s["shape"]) == FRAME), sweep[0])
    return {
        **frame,
        "threads": 1,
        "target_gb_s": TARGET_GB_S,
        "meets_target": all(frame["codecs"][c]["gb_s"] >= TARGET_GB_S for c in ("int8", "int4")),
        "sweep": sweep,
    }
