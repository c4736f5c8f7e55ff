"""`secure-ci device ...`: Device-side client commands."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from secure_ci.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from secure_ci.attestation import Collateral, Policy
    from secure_ci.device import DeviceIdentity, Output
    from secure_ci.partition import PartitionPlan

app = typer.Typer(help="Device-side client commands.", no_args_is_help=True)

MAX_INPUT_BYTES = 64 << 20


def _read(path: Path, what: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data


def load_input(path: Path) -> torch.Tensor:
    """One input tensor from a ``.npy`` (no pickles) or ``.pt`` (``weights_only``) file."""
    import io
    import pickle

    import numpy as np
    import torch

    data = _read(path, "input")
    try:
        if path.suffix == ".npy":
            value: Any = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        elif path.suffix == ".pt":
            value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        else:
            raise ConfigError(f"input {path} must be a .npy or .pt file")
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"cannot load input {path}: {exc}") from exc
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"input {path} does not hold a single tensor")
    return value.float()


def _identity(path: Path | None) -> DeviceIdentity:
    from secure_ci.device import DeviceIdentity

    if path is None:
        identity = DeviceIdentity.generate()
        typer.echo(f"using a fresh identity {identity.address_text}", err=True)
        return identity
    return DeviceIdentity.from_hex(_read(path, "identity key", 4096).decode("ascii", "replace"))


@app.command()
def infer(
    inputs: Annotated[list[Path], typer.Argument(help="Input tensors (.npy or .pt), one each.")],
    edge: Annotated[str, typer.Option("--edge", help="Edge address HOST:PORT.")],
    policy: Annotated[Path, typer.Option("--policy", help="Attestation policy (TOML).")],
    collateral: Annotated[
        Path | None,
        typer.Option(help="Collateral bundle (JSON); default: collateral.json by the policy."),
    ] = None,
    identity: Annotated[
        Path | None, typer.Option(help="Device key file (hex); default: a fresh key.")
    ] = None,
    model: Annotated[str, typer.Option(help="Zoo model name.")] = "digits_cnn",
    seed: Annotated[int, typer.Option(help="Weights seed (must match the edge).")] = 0,
    cut: Annotated[int, typer.Option(help="Cut index.")] = 2,
    codec: Annotated[str, typer.Option(help="Boundary feature codec.")] = "int8",
    timeout: Annotated[float, typer.Option(help="Seconds per request and handshake.")] = 30.0,
    at: Annotated[int | None, typer.Option(help="Pin the clock (Unix seconds).")] = None,
) -> None:
    """Run INPUTs through the model split between this device and an attested edge.

    Prints one JSON line per input: the output and its argmax.
    """
    import torch

    from secure_ci.attestation import Collateral, Policy
    from secure_ci.partition import Partitioner, PartitionPlan
    from secure_ci.zoo import get

    the_policy = Policy.from_toml(
        _read(policy, "policy").decode("utf-8", "replace"), base_dir=policy.parent
    )
    bundle = _read(collateral or policy.parent / "collateral.json", "collateral")
    the_collateral = Collateral.from_json(bundle)
    device = _identity(identity)
    tensors = [load_input(p) for p in inputs]
    entry = get(model)
    torch.manual_seed(seed)
    full = entry.build()
    partitioner = Partitioner(full, (torch.zeros(entry.input_shape),))
    head, _ = partitioner.split(cut)
    plan = PartitionPlan(partitioner.model_id, cut, codec)
    size = math.prod(entry.input_shape)  # accept unbatched inputs of the right size
    batch = [t.reshape(entry.input_shape) if t.numel() == size else t for t in tensors]
    clock = time.time if at is None else (lambda: float(at))
    outputs = asyncio.run(
        _infer(edge, the_policy, the_collateral, device, head, plan, batch, timeout, clock)
    )
    for path, output in zip(inputs, outputs, strict=True):
        flat = output if isinstance(output, torch.Tensor) else output[0]
        typer.echo(
            json.dumps(
                {
                    "input": str(path),
                    "argmax": int(flat.argmax()),
                    "output": [round(float(v), 6) for v in flat.flatten()],
                }
            )
        )


async def _infer(
    edge: str,
    policy: Policy,
    collateral: Collateral,
    identity: DeviceIdentity,
    head: torch.nn.Module,
    plan: PartitionPlan,
    xs: list[torch.Tensor],
    request_timeout: float,
    clock: Callable[[], float],
) -> list[Output]:
    from secure_ci.device import open_session

    async with open_session(
        edge,
        policy=policy,
        collateral=collateral,
        identity=identity,
        model=head,
        plan=plan,
        timeout=request_timeout,
        clock=clock,
    ) as session:
        return await session.infer_many(xs)
