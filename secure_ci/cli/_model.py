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
DIGITS_TRAINING = "digits training split (sklearn load_digits, 70 %, seed 0)"


def parse_exits(text: str) -> tuple[int, ...]:
    """``"2,4"`` -> ``(2, 4)``; ConfigError for anything else."""
    try:
        cuts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"bad --exits {text!r}: expected cut indices like 2,4") from None
    if any(cut < 0 for cut in cuts):
        raise ConfigError(f"bad --exits {text!r}: cut indices are non-negative")
    return cuts


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
    exits: Annotated[
        str | None,
        typer.Option(
            "--exits",
            metavar="CUTS",
            help="Exit heads at these cuts, e.g. 2,4 (default: up to two early cuts when the "
            "model is calibrated).",
        ),
    ] = None,
    no_exits: Annotated[bool, typer.Option("--no-exits", help="Pack no exit heads.")] = False,
    canonical: Annotated[
        str | None,
        typer.Option(
            "--canonical",
            metavar="RULE",
            help="The canonical output disputes compare: topk:K or quantize:STEP (default: "
            "topk:1 for a classifier, else quantize:0.015625).",
        ),
    ] = None,
) -> None:
    """Pack MODEL with its weights into one file (digits_cnn: calibrated on held-out data,
    with exit heads trained on the training split and calibrated on the held-out one)."""
    import torch

    from secure_ci import zoo
    from secure_ci.package import build_zoo_model, pack_model
    from secure_ci.partition import parse_canonical
    from secure_ci.zoo._train import load_digits_data, load_trained_digits

    if (weights is None) == (not train):
        raise ConfigError("give exactly one of --weights FILE or --train")
    if train and model != DIGITS:
        raise ConfigError(f"--train is only available for {DIGITS}")
    if exits is not None and no_exits:
        raise ConfigError("give at most one of --exits CUTS or --no-exits")
    exit_cuts = () if no_exits else None if exits is None else parse_exits(exits)
    try:
        rule = None if canonical is None else parse_canonical(canonical)
    except PackageError as exc:
        raise ConfigError(f"bad --canonical: {exc}") from None
    entry = zoo.get(model)
    shape = parse_shape(input_shape) if input_shape is not None else entry.input_shape
    torch.set_num_threads(1)  # profiles are measured with one thread, as a device runs
    console = Console(stderr=True)
    start = time.perf_counter()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        step = _progress_hook(progress)
        calibration = exit_training = None
        if train:
            trained = load_trained_digits(
                cache_dir or default_cache_dir(), progress=lambda d, t: step("training", d, t)
            )
            module = trained.model
            calibration = (trained.data.test_x, trained.data.test_y)
            exit_training = (trained.data.train_x, trained.data.train_y)
        elif weights is not None:
            module = build_zoo_model(model, _read_weights(weights), error=ConfigError)
            if model == DIGITS and shape == entry.input_shape:
                data = load_digits_data()
                calibration = (data.test_x, data.test_y)
                exit_training = (data.train_x, data.train_y)
        package = pack_model(
            module,
            architecture=model,
            input_shape=shape,
            out=out,
            calibration=calibration,
            calibration_source=DIGITS_CALIBRATION,
            repeats=repeats,
            progress=step,
            exits=exit_cuts,
            exit_training=exit_training,
            exit_training_source=DIGITS_TRAINING,
            canonical=rule,
        )
    elapsed = time.perf_counter() - start
    accuracy = package.calibration.accuracy if package.calibration is not None else None
    Console(highlight=False, soft_wrap=True).print(
        f"packed {model} -> {out} ({package.size} bytes, {len(package.cuts)} cuts, "
        f"model_id {package.model_id_hex}) in {elapsed:.1f} s"
        + (f"; accuracy on the calibration set {100 * accuracy:.2f} %" if accuracy else "")
        + (
            f"; exit heads at cuts {', '.join(map(str, package.exit_cuts))}"
            if package.exit_cuts
            else ""
        )
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


def _exits_table(package: ModelPackage) -> Table | None:
    table_info = package.manifest.exits
    if table_info is None:
        return None
    table = Table(title="exit heads: exit rate and accuracy drop per max-softmax threshold")
    table.add_column("#", justify="right")
    table.add_column("cut after")
    table.add_column("head ms", justify="right")
    thresholds = list(dict.fromkeys(row.threshold for h in table_info.heads for row in h.rows))
    for threshold in thresholds:
        table.add_column(f"{threshold:g}", justify="right")
    for head in table_info.heads:
        by_threshold = {row.threshold: row for row in head.rows}
        cells = [
            f"{100 * r.p_exit:.1f} % {r.accuracy_drop_pt:+.2f}pt"
            if (r := by_threshold.get(t)) is not None
            else "-"
            for t in thresholds
        ]
        table.add_row(str(head.cut), package.cuts[head.cut].name, f"{head.head_ms:.3f}", *cells)
    return table


@app.command()
def inspect(
    package_path: Annotated[Path, typer.Argument(metavar="PKG", help="A model package file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Verify PKG and print what it holds: model id, cuts, profile, codec table, exit heads."""
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
    if package.manifest.exits is not None:
        training, held_out = package.manifest.exits.training, package.manifest.exits.calibration
        lines.append(
            f"exit heads  trained on {training.samples} samples of {training.source} (exit seed "
            f"{training.seed}); calibrated on {held_out.samples} samples of {held_out.source}, "
            f"accuracy {100 * held_out.accuracy:.2f} %"
        )
    for line in lines:
        console.print(line, markup=False)
    console.print(_cuts_table(package, summary))
    console.print(_codec_table(package))
    exits = _exits_table(package)
    console.print("exit heads  none" if exits is None else exits, markup=False)


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
