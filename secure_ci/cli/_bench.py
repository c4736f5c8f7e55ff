"""`secure-ci bench NAME`: run a benchmark from the source checkout's ``benchmarks/``.

A benchmark is ``benchmarks/<name>.py`` defining ``run(*, quick: bool) -> dict`` (JSON-ready;
it may also take ``size``, one of :data:`SIZES`) and optionally ``plot(result, path)``.
Benchmarks live in the source checkout, not in the installed package.

Every run goes through :func:`run_benchmark`, which adds a ``run`` record to the JSON: the git
commit (and whether the tree was dirty), the machine's load average before and after, its CPU
count, the size, wall time and versions. So every benchmark carries it alike, including ones
written later. ``--plot`` uses the benchmark's own ``plot`` or, when it has none, a generic
chart of its throughput and latency figures (``_bench_plot``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console

from secure_ci.cli._app import app
from secure_ci.exceptions import ConfigError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
LINKS = ("user", "kernel")
"""``user``: the in-process link shaper; ``kernel``: tc tbf in a network namespace of the
benchmark's own (rate), with the delay left to the user-space shaper (no netem here)."""
SIZES = ("smoke", "quick", "full")
"""``smoke``: the smallest run that still exercises every part (the tests use it); ``quick``:
minutes at most; ``full``: the figures for the record. A benchmark without a ``size``
parameter runs ``smoke`` as ``quick``."""


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
    sys.modules[spec.name] = module  # dataclasses (and pickling) look the module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _git(*args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603  (fixed argv, no shell)
            [git, "-C", str(BENCH_DIR.parent), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_benchmark(name: str, *, size: str = "full", link: str = "user") -> dict[str, Any]:
    """Run benchmark ``name`` at ``size``; its JSON-ready result with a ``run`` record.
    ``link="kernel"``: links are shaped by the kernel (the caller runs in its own network
    namespace, see :func:`secure_ci.testing.in_namespace`), for benchmarks that shape one."""
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; one of {', '.join(SIZES)}")
    if link not in LINKS:
        raise ConfigError(f"unknown link {link!r}; one of {', '.join(LINKS)}")
    module = load(name)
    parameters = inspect.signature(module.run).parameters
    takes_size = "size" in parameters
    if link != "user" and "link" not in parameters:
        raise ConfigError(f"benchmark {name!r} shapes no link: --link kernel does not apply")
    status = _git("status", "--porcelain", "--untracked-files=no")
    record: dict[str, Any] = {
        "benchmark": name,
        "size": size if takes_size or size != "smoke" else "quick",
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_avg_start": _load(),
    }
    start = time.perf_counter()
    quick = size != "full"
    options: dict[str, Any] = {"size": size} if takes_size else {}
    if link != "user":
        options["link"] = link
    record["link"] = link
    result: dict[str, Any] = module.run(quick=quick, **options)
    record["wall_seconds"] = round(time.perf_counter() - start, 2)
    record["load_avg_end"] = _load()
    record["platform"] = platform.platform()
    record["versions"] = {
        "python": platform.python_version(),
        **{p: _version(p) for p in ("secure-ci", "torch", "numpy", "dcap-qvl", "web3")},
    }
    if not isinstance(result, dict):
        raise ConfigError(f"benchmark {name!r} returned {type(result).__name__}, not a dict")
    result["run"] = record
    return result


def plot_benchmark(name: str, result: dict[str, Any], path: Path) -> None:
    """The benchmark's own plot, or the generic throughput/latency chart (PNG at ``path``)."""
    module = load(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "plot"):
        module.plot(result, path)
        return
    from secure_ci.cli._bench_plot import plot_generic

    plot_generic(name, result, path)


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark name (a file in benchmarks/).")],
    quick: Annotated[bool, typer.Option("--quick", help="Same as --size quick.")] = False,
    size: Annotated[
        str | None, typer.Option(help="smoke (smallest, every part), quick or full.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON summary to this path.")
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG plot of the results.")
    ] = None,
    link: Annotated[
        str,
        typer.Option(
            help="user: the in-process link shaper; kernel: tc tbf on the loopback of a network"
            " namespace of the benchmark's own (unshare -rn; for benchmarks that shape a link)."
        ),
    ] = "user",
) -> None:
    """Run a benchmark and print its figures (targets are in ARCHITECTURE.md).

    The JSON records the git commit and the machine's load; every benchmark can plot.
    """
    if quick and size not in (None, "quick"):
        raise ConfigError("--quick means --size quick; give one of them")
    if link == "kernel":
        from secure_ci.testing._netns import inside_namespace

        if not inside_namespace():
            raise typer.Exit(_in_namespace())
    result = run_benchmark(name, size=size or ("quick" if quick else "full"), link=link)
    text = json.dumps(result, indent=2, sort_keys=True)
    Console().print_json(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    if plot_path is not None:
        plot_benchmark(name, result, plot_path)


def _in_namespace() -> int:
    """Run this very command again in a network namespace of its own; its exit status."""
    from secure_ci.testing._netns import in_namespace

    argv, env = in_namespace([sys.executable, "-m", "secure_ci", *sys.argv[1:]])
    child = subprocess.Popen(argv, env=env)  # noqa: S603
    try:
        return child.wait()
    except KeyboardInterrupt:  # the child got the SIGINT too: let it clean up, then go
        try:
            child.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            child.kill()
            child.wait()
        return 130
