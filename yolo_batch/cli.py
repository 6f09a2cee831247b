"""The ``yolo-batch`` command: parse, build a typed config, make one library call, render."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import yaml

from yolo_batch import __version__
from yolo_batch.config import DEFAULT_MODEL, BatchRequest, LrScaling, Rounding, SizingConfig, TrainConfig
from yolo_batch.errors import InputError, YoloBatchError


class CommandError(click.ClickException):
    """A library error as one line on stderr, with exit code 2 for bad input and 1 otherwise."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def library_errors() -> Iterator[None]:
    try:
        yield
    except (InputError, FileExistsError) as exc:
        raise CommandError(str(exc), 2) from None
    except YoloBatchError as exc:
        raise CommandError(str(exc), 1) from None


def parse_set(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as YAML scalars (``0.01``, ``true``, ``SGD``)."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"'{item}' is not key=value", ctx=ctx, param=param)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def sizing_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``train``, ``autobatch`` and ``bench autobatch``."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Ultralytics yaml name (yolo11n.yaml, yolo11s.yaml, ...) or a local .pt file."),
        click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Data yaml in YOLO layout. Default: the built-in synthetic 'shapes' set."),
        click.option("--imgsz", type=int, default=640, show_default=True, help="Training image size (multiple of 32)."),
        click.option("--device", default=None, help="'cpu', '0' or '0,1'. Default: GPU 0 if present, else CPU."),
        click.option("--batch", "batch", default=None,
                     help="N (fixed), -1 (AutoBatch) or a memory fraction such as 0.7. Default: -1."),
        click.option("--auto", "auto", is_flag=True, help="AutoBatch, same as --batch -1."),
        click.option("--round", "rounding", type=click.Choice([r.value for r in Rounding]), default="pow2",
                     show_default=True, help="How the AutoBatch result is rounded down."),
        click.option("--nominal-batch", type=int, default=64, show_default=True,
                     help="Batch the learning rate is tuned for (Ultralytics nbs); gradients accumulate to it."),
        click.option("--lr-scaling", type=click.Choice([r.value for r in LrScaling]), default="auto",
                     show_default=True, help="lr0 rule when the effective batch differs from the nominal one "
                                             "(auto: linear for SGD, sqrt for Adam-family)."),
        click.option("--epochs", type=int, default=100, show_default=True),
        click.option("--no-cache", is_flag=True, help="Re-measure instead of reusing a cached decision."),
        click.option("--set", "extra", multiple=True, callback=parse_set, metavar="KEY=VALUE",
                     help="Any other Ultralytics train argument, repeatable (e.g. --set optimizer=SGD)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_train_config(opts: dict[str, Any], project: str | None = None, name: str | None = None) -> TrainConfig:
    """Map parsed options onto the typed configs (raises InputError for bad values)."""
    if opts["auto"] and opts["batch"] not in (None, "-1"):
        raise InputError(f"--auto and --batch {opts['batch']} disagree: give one of them")
    batch = BatchRequest.parse(opts["batch"]) if opts["batch"] is not None else BatchRequest()
    sizing = SizingConfig(
        model=opts["model"], data=opts["data"], imgsz=opts["imgsz"], device=opts["device"], batch=batch,
        rounding=Rounding(opts["rounding"]), nominal_batch=opts["nominal_batch"],
        lr_scaling=LrScaling(opts["lr_scaling"]), epochs=opts["epochs"], use_cache=not opts["no_cache"],
    )
    return TrainConfig(sizing=sizing, project=project, name=name, extra=opts["extra"])


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body with library errors mapped to one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with library_errors():
            return fn(*args, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="yolo-batch")
def main() -> None:
    """Batch size as a solved problem for Ultralytics YOLO."""


@main.command()
@sizing_options
@click.option("--project", default=None, help="Ultralytics project folder (runs/detect by default).")
@click.option("--name", default=None, help="Run name inside the project folder.")
@command
def train(project: str | None, name: str | None, **opts: Any) -> None:
    """Train with an AutoBatch decision (printed, and saved as autobatch.json in the run folder)."""
    from yolo_batch.render import print_decision
    from yolo_batch.training import train as run_training

    result = run_training(build_train_config(opts, project, name), on_decision=print_decision)
    click.echo(f"run folder: {result.save_dir}")
    click.echo(f"decision:   {result.decision_path}")
    if result.weights is not None:
        click.echo(f"weights:    {result.weights}")


@main.command()
@sizing_options
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON only.")
@command
def autobatch(as_json: bool, **opts: Any) -> None:
    """Estimate the training batch only (no training)."""
    from yolo_batch.autobatch import estimate_batch
    from yolo_batch.training import split_train_args
    from yolo_batch.ultralytics_adapter import quiet

    config = build_train_config(opts)
    sizing, _ = split_train_args(config.sizing, config.extra)
    with quiet() if as_json else contextlib.nullcontext():
        decision = estimate_batch(sizing)
    if as_json:
        click.echo(decision.to_json())
    else:
        from yolo_batch.render import print_decision

        print_decision(decision)


@main.group(invoke_without_command=True)
@click.pass_context
def datasets(ctx: click.Context) -> None:
    """List the built-in synthetic datasets (or make one with 'datasets make')."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from yolo_batch_datasets import list_builtin

    table = Table(title="Built-in synthetic datasets", title_justify="left")
    for column in ("name", "classes", "train", "val", "imgsz", "description"):
        table.add_column(column)
    for spec in list_builtin():
        table.add_row(spec.name, ", ".join(spec.class_names), str(spec.n_train), str(spec.n_val), str(spec.imgsz),
                      spec.description)
    Console().print(table)


@datasets.command("make")
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@command
def datasets_make(name: str, out_dir: Path, seed: int, overwrite: bool) -> None:
    """Write the built-in dataset NAME into OUT_DIR (YOLO layout with data.yaml)."""
    from yolo_batch_datasets import make_dataset

    try:
        data_yaml = make_dataset(name, out_dir, seed=seed, overwrite=overwrite)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    click.echo(str(data_yaml))


@main.group()
def bench() -> None:
    """Benchmarks against the Ultralytics baseline, measured in one run."""


@bench.command("autobatch")
@sizing_options
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@command
def bench_autobatch(as_json: bool, **opts: Any) -> None:
    """Ours vs Ultralytics' check_train_batch_size on the same GPU: batch, time, real peak, OOM."""
    from yolo_batch.bench import run_autobatch_bench

    config = build_train_config(opts)
    report = run_autobatch_bench(config.sizing)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif report.skipped:
        click.echo(report.skipped)
    else:
        from rich.console import Console

        Console().print(report.table())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
