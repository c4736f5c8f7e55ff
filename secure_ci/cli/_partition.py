"""`secure-ci partition ...`: cut points, boundary sizes, latency profiles."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from secure_ci.exceptions import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from secure_ci.partition import Partitioner, Profile

app = typer.Typer(
    help="Analyse and split models: cut points, boundary sizes, latency profiles.",
    no_args_is_help=True,
)

MAX_INPUT_ELEMENTS = 1 << 26


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; ConfigError for anything else."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"bad --input-shape {text!r}: expected integers like 1,3,32,32") from None
    if not 1 <= len(shape) <= 8 or any(d < 1 for d in shape):
        raise ConfigError(f"bad --input-shape {text!r}: 1 to 8 positive dimensions")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ConfigError(f"--input-shape {text!r} is too large ({math.prod(shape)} elements)")
    return shape


def load_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A zoo name or ``module:callable``; returns the model and its default input shape."""
    from secure_ci import zoo

    if ":" not in spec:
        entry = zoo.get(spec)
        return entry.build(), entry.input_shape
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot load model {spec!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"{spec!r} is not callable")
    return factory(), None


def _table(name: str, partitioner: Partitioner, measured: Profile | None) -> Table:
    table = Table(
        title=f"{name}  model_id {partitioner.model_id[:16]}…  {len(partitioner.cuts)} cuts"
    )
    for column in ("#", "cut after", "boundary", "KiB", "head ms", "tail ms", "FLOPs %", "min"):
        table.add_column(column, justify="left" if column in ("cut after", "boundary") else "right")
    for cut in partitioner.cuts:
        timing = measured.cuts[cut.index] if measured is not None else None
        table.add_row(
            str(cut.index),
            cut.name,
            " + ".join("x".join(map(str, spec.shape)) for spec in cut.boundary),
            f"{cut.nbytes / 1024:.1f}",
            f"{timing.head_ms:.3f}" if timing else "-",
            f"{timing.tail_ms:.3f}" if timing else "-",
            f"{100 * cut.head_flops_share:.1f}",
            "◆" if cut.bottleneck else "",
        )
    return table


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="A zoo model name, or module:callable.")],
    input_shape: Annotated[
        str | None,
        typer.Option("--input-shape", help="e.g. 1,3,32,32 (default: the zoo model's)."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write cuts and profile as JSON here.")
    ] = None,
    with_profile: Annotated[
        bool, typer.Option("--profile/--no-profile", help="Measure head/tail latency per cut.")
    ] = True,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs per cut.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed for weights and example input.")] = 0,
) -> None:
    """Print every cut of MODEL: boundary tensors, KiB, head/tail latency, bottlenecks (◆)."""
    import torch

    from secure_ci.partition import Partitioner, profile

    torch.manual_seed(seed)
    module, default_shape = load_model(model)
    if input_shape is not None:
        shape = parse_shape(input_shape)
    elif default_shape is not None:
        shape = default_shape
    else:
        raise ConfigError(f"--input-shape is required for {model!r} (not a zoo model)")
    partitioner = Partitioner(module, (torch.randn(shape),))
    measured = profile(partitioner, repeats=repeats, threads=threads) if with_profile else None
    Console().print(_table(model, partitioner, measured))
    if json_path is not None:
        summary: dict[str, Any] = {
            "model": model,
            "model_id": partitioner.model_id,
            "input_shape": list(shape),
            "total_flops": partitioner.total_flops,
            "total_params": partitioner.total_params,
            "cuts": [cut.to_json() for cut in partitioner.cuts],
            "profile": measured.to_json() if measured is not None else None,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
