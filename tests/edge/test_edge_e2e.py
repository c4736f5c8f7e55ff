"""End to end: ``secure-ci edge serve`` in a separate process, the device library in this one.

The edge runs the simulated enclave and exports its dev root and collateral; the device trusts
exactly that root and measurement, runs the head, and must get the same output as local,
unsplit inference (per codec tolerance), with every result signed by the attested enclave.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_ci.attestation import Collateral, Policy
from secure_ci.device import DeviceIdentity, open_session
from secure_ci.edge import format_address
from secure_ci.exceptions import RemoteProtocolError
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.zoo import get

pytestmark = pytest.mark.slow

CUT = 2
MRENCLAVE = "5e" * 32


def _config(tmp_path: Path, device: DeviceIdentity) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f"""
provider = "simulated"
allowed_devices = ["{device.address_text}"]

[listen]
host = "127.0.0.1"
port = 0

[[models]]
zoo = "digits_cnn"
cuts = [{CUT}]
codecs = ["float32", "int8"]
seed = 0

[limits]
max_wait_ms = 1.0

[simulated]
mrenclave = "{MRENCLAVE}"
mrsigner = "{"a1" * 32}"
export_dir = "pki"
"""
    )
    return path


def _lines(proc: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put("<eof>")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


@pytest.fixture
def edge_process(tmp_path: Path) -> Iterator[tuple[dict[str, str], DeviceIdentity, Path, Any]]:
    device = DeviceIdentity.generate()
    config = _config(tmp_path, device)
    proc = subprocess.Popen(
        [sys.executable, "-m", "secure_ci", "edge", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines, reader = _lines(proc)
    try:
        info: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while "ready" not in info:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line == "<eof>":
                raise RuntimeError(f"edge exited early: {info}")
            key, _, value = line.partition(" ")
            info[key] = value
        yield info, device, tmp_path / "pki", (proc, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_device_and_edge_processes_agree_with_local_inference(
    edge_process: tuple[dict[str, str], DeviceIdentity, Path, Any],
) -> None:
    info, device, pki, handles = edge_process
    proc, lines = handles  # type: ignore[misc]
    root = x509.load_pem_x509_certificate((pki / "dev-root.pem").read_bytes())
    policy = Policy(
        roots=(root.public_bytes(Encoding.DER),), mrenclave=frozenset({bytes.fromhex(MRENCLAVE)})
    )
    collateral = Collateral.from_json((pki / "collateral.json").read_text())
    entry = get("digits_cnn")
    torch.manual_seed(0)
    model = entry.build()
    example = torch.zeros(entry.input_shape)
    model_id = Partitioner(model, (example,)).model_id
    assert f"model {model_id} cut {CUT}" in {f"model {v}" for k, v in info.items() if k == "model"}
    xs = [torch.randn(entry.input_shape) for _ in range(6)]
    with torch.inference_mode():
        expected = [model(x) for x in xs]
    address = info["listening"]
    for codec, tolerance in (("float32", 1e-5), ("int8", 0.1)):
        plan = PartitionPlan(model_id=model_id, cut=CUT, codec=codec)
        fresh = dataclasses.replace(policy, require_nonce=codec == "int8")  # Challenge/Evidence
        async with open_session(
            address, policy=fresh, collateral=collateral, identity=device, model=model,
            plan=plan, example_input=example,
        ) as session:  # fmt: skip
            assert session.enclave.mrenclave == bytes.fromhex(MRENCLAVE)
            outputs = await session.infer_many(xs)
            for out, ref in zip(outputs, expected, strict=True):
                assert isinstance(out, torch.Tensor)
                torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)
            assert len(session.receipts) == len(xs)
            assert {format_address(r.request.edge) for r in session.receipts} == {info["enclave"]}
    stranger = DeviceIdentity.generate()
    plan = PartitionPlan(model_id=model_id, cut=CUT, codec="float32")
    with pytest.raises(RemoteProtocolError) as refused:
        async with open_session(
            address, policy=policy, collateral=collateral, identity=stranger, model=model,
            plan=plan, example_input=example,
        ):  # fmt: skip
            pass
    assert refused.value.code == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    tail = []
    while True:
        line = lines.get(timeout=10)
        if line == "<eof>":
            break
        tail.append(line)
    assert "draining" in tail
    assert f"stopped after {2 * len(xs)} results" in tail
