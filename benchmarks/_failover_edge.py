"""A warm spare edge for the fail-over benchmark: a process that has imported everything and
loaded the package's tails, and serves once it reads a port on stdin.

Starting an edge process (torch, web3, the package) takes tens of seconds on a loaded
2-core machine, so a cold restart leaves a killed edge down for most of a short run; the
benchmark restarts a killed edge by handing its port to a spare instead (the edge it
starts is the same as ``secure_ci.testing._edge_process`` serves: dev PKI from
``--pki-seed``, the allowed devices). It prints ``warm`` once loaded, ``port N`` once it
listens; an empty stdin makes it exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from secure_ci.attestation import DevPKI
from secure_ci.edge import EdgeConfig, ModelRegistry, load_model_tails, open_edge
from secure_ci.edge._config import ModelSpec
from secure_ci.testing._attestation import DEV_NOW, dev_provider
from secure_ci.testing._edge_process import dev_fleet_policy


async def _serve(models: ModelRegistry, pki: DevPKI, port: int, devices: list[str]) -> None:
    allowed = frozenset(bytes.fromhex(d.removeprefix("0x")) for d in devices)
    config = EdgeConfig(port=port, allowed_devices=allowed)
    async with open_edge(
        config, provider=dev_provider(pki), models=models, clock=lambda: float(DEV_NOW)
    ) as edge:
        print(f"port {edge.port}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("package", type=Path)
    parser.add_argument("--pki-seed", type=int, required=True)
    parser.add_argument("--allow-device", action="append", default=[])
    args = parser.parse_args()
    _, pki = dev_fleet_policy(args.pki_seed)
    models = ModelRegistry()
    for tail in load_model_tails(ModelSpec(package=args.package)):
        models.add(tail)
    print("warm", flush=True)
    line = sys.stdin.readline().strip()
    if not line:
        return
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(models, pki, int(line), args.allow_device))


if __name__ == "__main__":
    main()
