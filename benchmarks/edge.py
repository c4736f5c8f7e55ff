"""Edge benchmark: security overhead, opportunistic batching, attested handshake time.

Two setups, each measured side by side in one run on the same machine: ``tail_20ms`` (the
zoo's ResNet-18 at width 64, split a quarter of the way in: most compute in the enclave's
tail) and ``tail_1ms`` (the zoo's transformer encoder split a quarter of the way in), both with
int8 features. For each, three edges run in their own processes on loopback (see
``_edge_servers``; the devices share this process): ``plain`` (no TLS, signatures or journal),
``secure`` (attested TLS 1.3, device-signed requests, enclave-signed results, journal in
memory) and ``durable`` (``secure`` with the SQLite journal on disk, fsync before answering).

* ``overhead``: ``latency_ratio`` is the median sequential round trip, secure / plain (the
  edges take turns in small chunks, so load drifts hit both); ``durable_latency_ratio`` the
  same with the disk journal; ``throughput_ratio`` requests/s of 8 pipelining devices.
* ``breakdown_us``: each part of a secure request measured alone (``_edge_costs``), with the
  parts the plaintext edge pays too marked, against ``measured_overhead_us`` (secure - plain).
* ``batching``: requests/s of 1 device (keeping ``max_batch`` requests in flight) and of 32
  devices (2 each) on the secure edge, divided by the tail's offline throughput on full
  batches measured right before.
* ``handshake_ms``: TLS 1.3 connect + RA-TLS evidence verification + Hello/Authenticate.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _edge_costs import breakdown
from _edge_servers import (
    MAX_BATCH,
    SETUPS,
    PlainDevice,
    Setup,
    bench_enclave,
    build_tail,
    device_keys,
    port_of,
    spawn,
    stop,
)

from secure_ci.edge import TailEntry
from secure_ci.partition import encode_features
from secure_ci.protocol import InferRequest, InferResult
from secure_ci.testing import DEV_NOW, RawDevice

Ports = dict[str, int]


async def _round_trips(device: Any, make: Callable[[], InferRequest], count: int) -> list[float]:
    times = []
    for _ in range(count):
        request = make()
        start = time.perf_counter()
        await device.stream.send(request)
        event = await device.stream.next_event()
        times.append(time.perf_counter() - start)
        if not isinstance(event, InferResult):
            raise RuntimeError(f"unexpected {event!r}")
    return times


async def _closed_loop(
    devices: list[Any], make: Callable[[Any], InferRequest], per: int, depth: int
) -> float:
    """Requests/s with each device keeping ``depth`` requests in flight for ``per`` requests.

    Requests are made (and signed) before the clock starts: that is device work, done on the
    devices' own hardware in a deployment, while this measures the edge.
    """
    prepared = {id(d): [make(d) for _ in range(per)] for d in devices}

    async def drive(device: Any) -> None:
        queue = iter(prepared[id(device)])
        sent = received = 0
        while sent < min(depth, per):
            await device.stream.send(next(queue))
            sent += 1
        while received < per:
            event = await device.stream.next_event()
            if not isinstance(event, InferResult):
                raise RuntimeError(f"unexpected {event!r}")
            received += 1
            if sent < per:
                await device.stream.send(next(queue))
                sent += 1

    start = time.perf_counter()
    await asyncio.gather(*(drive(d) for d in devices))
    return len(devices) * per / (time.perf_counter() - start)


def _offline_throughput(tail: TailEntry, sample: tuple[torch.Tensor, ...], seconds: float) -> float:
    """Rows/s of the tail alone on full batches (``max_batch`` rows, outputs encoded)."""
    batch = [sample] * MAX_BATCH
    tail.run_batch(batch)
    rows, start = 0, time.perf_counter()
    while rows == 0 or time.perf_counter() - start < seconds:
        tail.run_batch(batch)
        rows += MAX_BATCH
    return rows / (time.perf_counter() - start)


def _tail_ms(tail: TailEntry, sample: tuple[torch.Tensor, ...], repeats: int) -> float:
    tail.run_batch([sample])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tail.run_batch([sample])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def _bench_setup(setup: Setup, quick: bool, ports: Ports) -> dict[str, Any]:
    tail, head, input_shape = build_tail(setup)
    with torch.inference_mode():
        boundary = head(torch.randn(input_shape))
    payload = encode_features(boundary, setup.codec)
    sample = tail.decode(setup.codec, payload)
    (output,) = tail.run_batch([sample])
    enclave = bench_enclave()
    keys = device_keys()
    now = lambda: float(DEV_NOW)  # noqa: E731

    async def secure(key: bytes, kind: str = "secure") -> RawDevice:
        device = await RawDevice.connect(ports[kind], enclave=enclave, key=key, now_fn=now)
        await device.handshake()
        return device

    def secure_request(device: Any) -> InferRequest:
        return device.request(payload, model_id=tail.model_id, cut=tail.cut, codec=setup.codec)

    def plain_request(device: Any) -> InferRequest:
        return device.request(payload)

    result: dict[str, Any] = {
        "setup": {
            **setup.to_json(),
            "cut": tail.cut,
            "payload_bytes": len(payload),
            "max_batch": MAX_BATCH,
            "batched": tail.batchable,
        },
        "tail_ms": _tail_ms(tail, sample, 5 if quick else 50),
    }
    handshakes = []
    for i in range(4 if quick else 100):
        start = time.perf_counter()
        device = await secure(keys[i % len(keys)])
        handshakes.append((time.perf_counter() - start) * 1000)
        await device.aclose()
    result["handshake_ms"] = {
        "p50": statistics.median(handshakes),
        "p95": statistics.quantiles(handshakes, n=20)[18] if len(handshakes) > 1 else handshakes[0],
    }

    # Latency: the three edges take turns in chunks of 5 sequential round trips.
    plain_one = await PlainDevice.connect(ports["plain"], tail, setup.codec)
    secure_one, durable_one = await secure(keys[0]), await secure(keys[1], "durable")
    rounds = 2 if quick else 60
    lat: dict[str, list[float]] = {"plain": [], "secure": [], "durable": []}
    for _ in range(rounds):
        lat["plain"] += await _round_trips(plain_one, lambda: plain_request(plain_one), 5)
        lat["secure"] += await _round_trips(secure_one, lambda: secure_request(secure_one), 5)
        lat["durable"] += await _round_trips(durable_one, lambda: secure_request(durable_one), 5)
    for d in (plain_one, secure_one, durable_one):
        await d.aclose()
    median = {kind: statistics.median(times) * 1000 for kind, times in lat.items()}

    secure8 = [await secure(k) for k in keys[:8]]
    plain8 = [await PlainDevice.connect(ports["plain"], tail, setup.codec) for _ in range(8)]
    per = 4 if quick else 30
    tput_p_runs, tput_s_runs = [], []
    for _ in range(1 if quick else 5):
        tput_p_runs.append(await _closed_loop(plain8, plain_request, per, depth=4))
        tput_s_runs.append(await _closed_loop(secure8, secure_request, per, depth=4))
    tput_p, tput_s = statistics.median(tput_p_runs), statistics.median(tput_s_runs)
    for d in [*secure8, *plain8]:
        await d.aclose()
    result["overhead"] = {
        "latency_ms_plain": median["plain"],
        "latency_ms_secure": median["secure"],
        "latency_ms_durable": median["durable"],
        "latency_ratio": median["secure"] / median["plain"],
        "durable_latency_ratio": median["durable"] / median["plain"],
        "measured_overhead_us": (median["secure"] - median["plain"]) * 1000,
        "measured_durable_overhead_us": (median["durable"] - median["plain"]) * 1000,
        "throughput_plain": tput_p,
        "throughput_secure": tput_s,
        "throughput_ratio": tput_s / tput_p,
    }
    result["breakdown_us"] = await breakdown(enclave, tail, payload, output, 20 if quick else 500)

    batching = []
    for n, depth in ((1, MAX_BATCH), (32, 2)):
        devices = [await secure(k) for k in keys[:n]]
        per = max(depth, (2 * MAX_BATCH if quick else 16 * MAX_BATCH) // n)
        offline = _offline_throughput(tail, sample, 0.2 if quick else 2.0)  # same load now
        rate = await _closed_loop(devices, secure_request, per, depth=depth)
        batching.append(
            {
                "devices": n,
                "depth": depth,
                "requests_per_s": rate,
                "offline_rows_per_s": offline,
                "ratio_to_offline": rate / offline,
            }
        )
        for d in devices:
            await d.aclose()
    result["batching"] = batching
    return result


def run(*, quick: bool) -> dict[str, Any]:
    """Run the edge benchmark (see the module docstring)."""
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for setup in SETUPS:
        kinds = ("plain", "secure", "durable")
        procs = []
        try:
            for kind in kinds:  # the three start side by side
                procs.append(spawn(kind, setup))
            ports: Ports = {kind: port_of(proc) for kind, proc in zip(kinds, procs, strict=True)}
            results[setup.name] = asyncio.run(_bench_setup(setup, quick, ports))
        finally:
            for proc in procs:
                stop(proc)
    return {"setups": results, "quick": quick}


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency (plain, secure, durable), the secure overhead by part, batching vs offline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = result["setups"]
    names = list(setups)
    figure, (lat, parts, batch) = plt.subplots(1, 3, figsize=(15, 4.8))
    width = 0.25
    for k, kind in enumerate(("plain", "secure", "durable")):
        values = [
            setups[n]["overhead"][f"latency_ms_{kind}"] / setups[n]["overhead"]["latency_ms_plain"]
            for n in names
        ]
        lat.bar([i + (k - 1) * width for i in range(len(names))], values, width, label=kind)
    lat.axhline(1.05, color="black", linestyle=":", label="target 1.05")
    lat.set_xticks(range(len(names)), names)
    lat.set_ylabel("round trip / plaintext round trip")
    lat.set_title("Latency, one device")
    lat.legend()
    # The security overhead by part: the secure edge's, then the durable edge's (+ fsync).
    colors = {"tls": "C0", "signature_sign": "C1", "signature_verify": "C2", "journal_fsync": "C3"}
    secure_parts = ["tls", "signature_sign", "signature_verify"]
    labelled: set[str] = set()
    positions = {n: (3 * i, 3 * i + 1) for i, n in enumerate(names)}
    for n in names:
        costs = setups[n]["breakdown_us"]
        for x, keys in zip(
            positions[n], (secure_parts, [*secure_parts, "journal_fsync"]), strict=True
        ):
            bottom = 0.0
            for k in keys:
                us = costs[k]["us"]
                hatch = "//" if k in ("signature_verify", "journal_fsync") else None
                label = None if k in labelled else k
                parts.bar(x, us, bottom=bottom, color=colors[k], hatch=hatch, label=label)
                labelled.add(k)
                bottom += us
        overhead = setups[n]["overhead"]
        parts.plot(positions[n][0], overhead["measured_overhead_us"], "k*", markersize=12)
        parts.plot(positions[n][1], overhead["measured_durable_overhead_us"], "kD", markersize=8)
    parts.set_xticks(
        [x for n in names for x in positions[n]],
        [f"{n}\n{kind}" for n in names for kind in ("secure", "durable")],
        fontsize=8,
    )
    parts.set_ylabel("µs per request (hatched: beside the tail, durable only)")
    parts.set_title("Security overhead by part (markers: measured - plain)")
    parts.legend(fontsize=7)
    for n in names:
        rows = setups[n]["batching"]
        batch.plot(
            [r["devices"] for r in rows], [r["ratio_to_offline"] for r in rows], "o-", label=n
        )
    for target, devices in ((0.8, 1), (0.9, 32)):
        batch.plot([devices], [target], "kx", markersize=10)
    batch.set_xscale("log", base=2)
    batch.set_xlabel("devices")
    batch.set_ylabel("requests/s / offline batched rows/s")
    batch.set_title("Throughput vs the tail offline (x: targets)")
    batch.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
