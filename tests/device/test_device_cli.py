"""`secure-ci device infer` against an edge served from another thread (real TLS)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.cli._device import load_input
from secure_ci.device import DeviceIdentity
from secure_ci.edge import EdgeConfig, ModelRegistry
from secure_ci.edge._models import load_zoo_tails
from secure_ci.edge._service import open_edge
from secure_ci.exceptions import ConfigError
from secure_ci.testing import DEV_MRENCLAVE, DEV_NOW, dev_enclave
from secure_ci.zoo import get

runner = CliRunner()
CUT = 2
CODECS = ("float32", "int8")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """An edge in its own thread and event loop; yields (port, policy file, key file)."""
    enclave = dev_enclave(DEV_NOW)
    identity = DeviceIdentity.generate()
    (tmp_path / "root.pem").write_text(enclave.pki.root_pem)
    (tmp_path / "collateral.json").write_text(enclave.pki.collateral_json)
    (tmp_path / "policy.toml").write_text(
        f'[attestation]\nroots = ["root.pem"]\nmrenclave = ["{DEV_MRENCLAVE.hex()}"]\n'
    )
    (tmp_path / "device.key").write_text(identity.key.hex())
    ports: queue.Queue[int] = queue.Queue()
    stop = threading.Event()

    async def serve() -> None:
        models = ModelRegistry()
        for tail in load_zoo_tails("digits_cnn", [CUT], CODECS, seed=0):
            models.add(tail)
        config = EdgeConfig(allowed_devices=frozenset({identity.address}))
        async with open_edge(
            config, provider=enclave.provider, models=models, clock=lambda: float(DEV_NOW)
        ) as edge:
            ports.put(edge.port)
            await asyncio.to_thread(stop.wait, 120)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield ports.get(timeout=60), tmp_path / "policy.toml", tmp_path / "device.key"
    finally:
        stop.set()
        thread.join(timeout=60)


def test_device_infer_prints_the_split_models_outputs(
    served: tuple[int, Path, Path], tmp_path: Path
) -> None:
    port, policy, key = served
    x1 = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(2))  # unbatched
    np.save(tmp_path / "a.npy", x1.numpy())
    torch.save(x2, tmp_path / "b.pt")
    result = runner.invoke(
        app,
        [
            "device", "infer", str(tmp_path / "a.npy"), str(tmp_path / "b.pt"),
            "--edge", f"127.0.0.1:{port}", "--policy", str(policy), "--identity", str(key),
            "--codec", "float32", "--at", str(DEV_NOW),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["input"] for line in lines] == [str(tmp_path / "a.npy"), str(tmp_path / "b.pt")]
    torch.manual_seed(0)  # the weights the edge drew with seed 0
    model = get("digits_cnn").build().eval()
    with torch.no_grad():
        for line, x in zip(lines, (x1, x2.reshape(1, 1, 32, 32)), strict=True):
            expected = model(x)
            assert line["argmax"] == int(expected.argmax())
            torch.testing.assert_close(torch.tensor([line["output"]]), expected, atol=1e-4, rtol=0)


def test_inputs_must_be_npy_or_pt_tensors(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("1 2 3")
    torch.save({"not": "a tensor"}, tmp_path / "d.pt")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    for name in ("x.txt", "d.pt", "bad.npy", "missing.npy"):
        with pytest.raises(ConfigError):
            load_input(tmp_path / name)
