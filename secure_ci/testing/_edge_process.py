"""An edge in its own process, for fault tests and benchmarks that kill -9 or SIGSTOP it.

``python -m secure_ci.testing._edge_process PACKAGE --allow-device 0x.. [--port N]
[--pki-seed S]`` serves a model package to the allowed devices from a dev enclave (a
deterministic dev PKI from ``--pki-seed`` at :data:`DEV_NOW`, so every process and the test
share one root) and prints ``port N`` once it listens. :func:`spawn_edge` starts one and
waits for that line; :class:`EdgeProcess` kills, stops, continues and restarts it (on the
same port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_ci.attestation import DevPKI, Policy
from secure_ci.testing._attestation import DEV_NOW, dev_policy, dev_provider

__all__ = ["EdgeProcess", "dev_fleet_policy", "spawn_edge", "spawn_edges"]

PKI_SEED = 7


def dev_fleet_policy(seed: int = PKI_SEED) -> tuple[Policy, DevPKI]:
    """The policy (and dev PKI) that accepts edges spawned with ``--pki-seed seed``."""
    pki = DevPKI.generate(DEV_NOW, seed=seed)
    return dev_policy(pki), pki


@dataclass
class EdgeProcess:
    """A running edge process (see :func:`spawn_edge`)."""

    package: Path
    port: int
    seed: int
    devices: tuple[str, ...]
    proc: subprocess.Popen[str] = field(repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """kill -9, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        """SIGSTOP: the process hangs, its sockets stay open."""
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 300.0) -> None:
        """Start it again on the same port (after :meth:`kill`)."""
        fresh = spawn_edge(
            self.package, port=self.port, seed=self.seed, devices=self.devices, timeout=timeout
        )
        self.proc = fresh.proc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.cont()
            self.kill()


def spawn_edge(
    package: Path,
    *,
    devices: tuple[str, ...],
    port: int = 0,
    seed: int = PKI_SEED,
    timeout: float = 300.0,
) -> EdgeProcess:
    """Start an edge process serving ``package`` to ``devices`` (0x addresses); returns
    once it listens."""
    return spawn_edges(package, [port], devices=devices, seed=seed, timeout=timeout)[0]


def spawn_edges(
    package: Path,
    ports: list[int],
    *,
    devices: tuple[str, ...],
    seed: int = PKI_SEED,
    timeout: float = 300.0,
    lie: bool = False,
) -> list[EdgeProcess]:
    """Start one edge process per port (0: any free one) at once; returns once all listen.
    ``lie``: the edges send outputs other than the ones their enclave signed."""
    allow = [arg for d in devices for arg in ("--allow-device", d)]
    if lie:
        allow.append("--lie")
    procs = [
        subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [
                sys.executable,
                "-m",
                "secure_ci.testing._edge_process",
                str(package),
                "--port",
                str(port),
                "--pki-seed",
                str(seed),
                *allow,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for port in ports
    ]
    try:
        started = []
        for proc in procs:
            line = _read_line(proc, timeout)
            if not line.startswith("port "):
                raise RuntimeError(f"edge process said {line!r}")
            started.append(EdgeProcess(package, int(line.split()[1]), seed, devices, proc))
        return started
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        raise


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    if proc.stdout is None:  # pragma: no cover - always piped
        raise RuntimeError("no stdout")
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"the edge process did not start within {timeout} s")
    return proc.stdout.readline().strip()


async def _serve(package: Path, port: int, seed: int, devices: list[str], lie: bool) -> None:
    from secure_ci.edge import EdgeConfig, ModelRegistry, load_model_tails, open_edge
    from secure_ci.edge._config import ModelSpec

    _, pki = dev_fleet_policy(seed)
    models = ModelRegistry()
    for tail in load_model_tails(ModelSpec(package=package)):
        models.add(tail)
    config = EdgeConfig(
        port=port, allowed_devices=frozenset(bytes.fromhex(d.removeprefix("0x")) for d in devices)
    )
    async with open_edge(
        config, provider=dev_provider(pki), models=models, clock=lambda: float(DEV_NOW)
    ) as edge:
        if lie:  # a Byzantine edge: signs the true output, sends another one
            honest = edge.run_request

            async def lying(device: bytes, request: Any, received_at: float) -> Any:
                result = await honest(device, request, received_at)
                forged = result.payload[:-1] + bytes([result.payload[-1] ^ 1])
                return dataclasses.replace(result, payload=forged)

            edge.run_request = lying  # type: ignore[method-assign]
        print(f"port {edge.port}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("package", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pki-seed", type=int, default=PKI_SEED)
    parser.add_argument("--allow-device", action="append", default=[])
    parser.add_argument("--lie", action="store_true", help="send outputs it did not sign")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.package, args.port, args.pki_seed, args.allow_device, args.lie))


if __name__ == "__main__":
    main()
