"""`secure-ci model ...`: pack a model into one verified file, and show what a package holds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from secure_ci.cli._demo import default_cache_dir
from secure_ci.cli._partition import parse_shape
from secure_ci.exceptions import ConfigError, PackageError

if TYPE_CHECKING:
    import torch

    from secure_ci.package import ModelPackage

app = typer.Typer(
    help="Model packages: a model's weights, cut analysis, profile and codec table in one file.",
    no_args_is_help=True,
)

DIGITS = "digits_cnn"
DIGITS_CALIBRATION = "digits held-out split (sklearn load_digits, 30 %, seed 0)"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or a ``.pt`` one read with weights_only=True."""
    from secure_ci.package import MAX_PACKAGE_BYTES, decode_weights, read_torch_state_dict

    try:
        with path.open("rb") as file:
            data = file.read(MAX_PACKAGE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read --weights {path}: {exc.strerror or exc}") from None
    torch_file = path.suffix in (".pt", ".pth", ".bin") or data[:4] == b"PK\x03\x04"
    try:
        return read_torch_state_dict(data) if torch_file else decode_weights(data)
    except PackageError as exc:
        kind = "torch state dict" if torch_file else "safetensors file"
        raise ConfigError(f"--weights {path} is not a usable {kind}: {exc}") from None


def _progress_hook(progress: Progress) -> Any:
    bar = progress.add_task("packing", total=None)

    def step(what: str, done: int, total: int) -> None:
        progress.update(bar, description=what, completed=done, total=total or None)

    return step


@app.command()
def pack(
    model: Annotated[str, typer.Argument(help="A zoo model name (see `partition inspect`).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the package.")],
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Weights: safetensors, or a .pt state dict.")
    ] = None,
    train: Annotated[
        bool, typer.Option("--train", help="Train (or load the cached) digits CNN and pack it.")
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Weights cache for --train (default ./.secure-ci/cache).")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="e.g. 1,3,32,32 (default: the zoo's).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, max=1000, help="Timed runs per cut.")] = 3,
) -> None:
    """Pack MODEL with its weights into one file (digits_cnn: calibrated on held-out data)."""
    import torch

    from secure_ci import zoo
    from secure_ci.package import build_zoo_model, pack_model
    from secure_ci.zoo._train import load_digits_data, load_trained_digits

    if (weights is None) == (not train):
        raise ConfigError("give exactly one of --weights FILE or --train")
    if train and model != DIGITS:
        raise ConfigError(f"--train is only available for {DIGITS}")
    entry = zoo.get(model)
    shape = parse_shape(input_shape) if input_shape is not None else entry.input_shape
    torch.set_num_threads(1)  # profiles are measured with one thread, as a device runs
    console = Console(stderr=True)
    start = time.perf_counter()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        step = _progress_hook(progress)
        calibration = None
        if train:
            trained = load_trained_digits(
                cache_dir or default_cache_dir(), progress=lambda d, t: step("training", d, t)
            )
            module = trained.model
            calibration = (trained.data.test_x, trained.data.test_y)
        elif weights is not None:
            module = build_zoo_model(model, _read_weights(weights), error=ConfigError)
            if model == DIGITS and shape == entry.input_shape:
                data = load_digits_data()
                calibration = (data.test_x, data.test_y)
        package = pack_model(
            module,
            architecture=model,
            input_shape=shape,
            out=out,
            calibration=calibration,
            calibration_source=DIGITS_CALIBRATION,
            repeats=repeats,
            progress=step,
        )
    elapsed = time.perf_counter() - start
    accuracy = package.calibration.accuracy if package.calibration is not None else None
    Console(highlight=False, soft_wrap=True).print(
        f"packed {model} -> {out} ({package.size} bytes, {len(package.cuts)} cuts, "
        f"model_id {package.model_id_hex}) in {elapsed:.1f} s"
        + (f"; accuracy on the calibration set {100 * accuracy:.2f} %" if accuracy else "")
    )


def _cuts_table(package: ModelPackage, summary: dict[str, Any]) -> Table:
    table = Table(title=f"{package.architecture}: {len(package.cuts)} cuts")
    for column in ("#", "cut after", "boundary", "KiB", "batch dim", "head ms", "tail ms"):
        table.add_column(column, justify="left" if column in ("cut after", "boundary") else "right")
    for cut in summary["cuts"]:
        table.add_row(
            str(cut["index"]),
            cut["name"],
            " + ".join("x".join(map(str, b["shape"])) for b in cut["boundary"]),
            f"{cut['nbytes'] / 1024:.1f}",
            ",".join(
                "-" if b["batch_dim"] is None else str(b["batch_dim"]) for b in cut["boundary"]
            ),
            "-" if cut["head_ms"] is None else f"{cut['head_ms']:.3f}",
            "-" if cut["tail_ms"] is None else f"{cut['tail_ms']:.3f}",
        )
    return table


def _codec_table(package: ModelPackage) -> Table:
    codecs = list(dict.fromkeys(row.codec for row in package.codecs))
    where = (
        "" if package.calibration is None else f", accuracy drop on {package.calibration.source}"
    )
    table = Table(title=f"codecs: bytes vs float32{where}")
    table.add_column("#", justify="right")
    for codec in codecs:
        table.add_column(codec, justify="right")
    cells: dict[int, dict[str, str]] = {}
    for row in package.codecs:
        drop = "" if row.accuracy_drop_pt is None else f" {row.accuracy_drop_pt:+.2f}pt"
        cells.setdefault(row.cut, {})[row.codec] = f"{100 * row.ratio:.1f} %{drop}"
    for cut, by_codec in sorted(cells.items()):
        table.add_row(str(cut), *(by_codec.get(codec, "-") for codec in codecs))
    return table


@app.command()
def inspect(
    package_path: Annotated[Path, typer.Argument(metavar="PKG", help="A model package file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Verify PKG and print what it holds: model id, cuts, profile, codec table."""
    from secure_ci.package import load_package

    package = load_package(package_path)
    summary = package.describe()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    console = Console(highlight=False, soft_wrap=True)
    calibration = package.calibration
    lines = [
        f"package     {package_path} ({package.size} bytes, digest {package.digest.hex()})",
        f"model       {package.architecture}, input {'x'.join(map(str, package.input_shape))}",
        f"model_id    {package.model_id_hex}",
        f"weights     {summary['weights']['tensors']} tensors, "
        f"{summary['weights']['parameters']} parameters, sha256 {summary['weights']['sha256']}",
        f"batchable   cuts {', '.join(map(str, package.batchable_cuts)) or 'none'}",
        "calibration "
        + (
            "none (codec bytes on random inputs)"
            if calibration is None
            else f"{calibration.source}: {calibration.samples} samples, "
            f"accuracy {100 * calibration.accuracy:.2f} %"
        ),
    ]
    for line in lines:
        console.print(line, markup=False)
    console.print(_cuts_table(package, summary))
    console.print(_codec_table(package))


@app.command()
def samples(
    out: Annotated[Path, typer.Option("--out", help="Where to write the inputs (.npy).")],
    count: Annotated[int, typer.Option(help="How many inputs (1..540).")] = 8,
) -> None:
    """Write held-out digits (the calibration split, never trained on) as one .npy stack for
    `secure-ci device infer`, and print their labels."""
    import io

    import numpy as np

    from secure_ci.edge._state import write_atomic
    from secure_ci.zoo._train import load_digits_data

    data = load_digits_data()
    if not 1 <= count <= len(data.test_y):
        raise ConfigError(f"--count must be 1..{len(data.test_y)}")
    buffer = io.BytesIO()
    np.save(buffer, data.test_x[:count].numpy(), allow_pickle=False)
    write_atomic(out, buffer.getvalue(), 0o644)
    typer.echo(f"labels {' '.join(str(int(y)) for y in data.test_y[:count])}")
    typer.echo(f"wrote {count} digits to {out}")
