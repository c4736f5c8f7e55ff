"""`secure-ci bench NAME`: run a benchmark from ``benchmarks/`` and write its JSON summary.

A benchmark is ``benchmarks/<name>.py`` defining ``run(*, quick: bool) -> dict`` (JSON-ready)
and optionally ``plot(result: dict, path: pathlib.Path) -> None``. Benchmarks live in the
source checkout, not in the installed package.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console

from secure_ci.cli._app import app
from secure_ci.exceptions import ConfigError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def load(name: str) -> ModuleType:
    names = available()
    if name not in names:
        raise ConfigError(f"unknown benchmark {name!r}; available: {', '.join(names) or 'none'}")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH_DIR / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load benchmark {name!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark name (a file in benchmarks/).")],
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes, for smoke runs.")] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON summary to this path.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG plot, where the benchmark has one.")
    ] = None,
) -> None:
    """Run a benchmark and print its figures (targets are in ARCHITECTURE.md)."""
    module = load(name)
    result: dict[str, Any] = module.run(quick=quick)
    text = json.dumps(result, indent=2, sort_keys=True)
    Console().print_json(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    if plot_path is not None:
        if not hasattr(module, "plot"):
            raise ConfigError(f"benchmark {name!r} has no plot")
        module.plot(result, plot_path)
