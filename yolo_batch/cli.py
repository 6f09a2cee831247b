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
from yolo_batch.errors import InputError, YoloBatchError
from yolo_batch.training.config import (
    DEFAULT_MODEL,
    BatchRequest,
    BnPolicy,
    LrScaling,
    Rounding,
    TrainConfig,
)


class CommandError(click.ClickException):
    """A library error as one line on stderr, with the exit code its class carries."""

    def __init__(self, error: YoloBatchError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code  # type: ignore[misc]  # click declares it on the class


@contextlib.contextmanager
def library_errors() -> Iterator[None]:
    """The one place library errors become a line on stderr and an exit code."""
    try:
        yield
    except YoloBatchError as exc:
        raise CommandError(exc) from None


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
        click.option("--profile", default=None, metavar="NAME|PATH.yaml",
                     help="default, medical, inspection or a profile file ('yolo-batch profiles'). "
                          "Options given here override it. Default: default."),
        click.option("--imgsz", type=int, default=None,
                     help="Training image size (multiple of 32). Default: the profile's (640; medical 1024)."),
        click.option("--device", default=None, help="'cpu', '0' or '0,1'. Default: GPU 0 if present, else CPU."),
        click.option("--batch", "batch", default=None,
                     help="N (fixed), -1 (AutoBatch) or a memory fraction such as 0.7. Default: -1."),
        click.option("--auto", "auto", is_flag=True, help="AutoBatch, same as --batch -1."),
        click.option("--round", "rounding", type=click.Choice([r.value for r in Rounding]), default=None,
                     help="How the AutoBatch result is rounded down. Default: the profile's (pow2)."),
        click.option("--nominal-batch", type=int, default=None,
                     help="Batch the learning rate is tuned for (Ultralytics nbs); gradients accumulate to it. "
                          "Default: the profile's (64)."),
        click.option("--lr-scaling", type=click.Choice([r.value for r in LrScaling]), default=None,
                     help="lr0 rule when the effective batch differs from the nominal one "
                          "(auto: linear for SGD, sqrt for Adam-family). Default: the profile's (auto)."),
        click.option("--bn", type=click.Choice([p.value for p in BnPolicy]), default=None,
                     help="BatchNorm during training: freeze keeps running statistics, sync uses SyncBatchNorm "
                          "across GPUs, auto decides from the batch (below 8 per device). Default: the profile's "
                          "(auto)."),
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
    from yolo_batch.profiles import load_profile, train_config

    batch = BatchRequest.parse(opts["batch"]) if opts["batch"] is not None else BatchRequest()
    return train_config(
        load_profile(opts["profile"] or "default"), model=opts["model"], data=opts["data"], device=opts["device"],
        batch=batch, epochs=opts["epochs"], use_cache=not opts["no_cache"], imgsz=opts["imgsz"],
        rounding=opts["rounding"], nominal_batch=opts["nominal_batch"], lr_scaling=opts["lr_scaling"], bn=opts["bn"],
        extra=opts["extra"], project=project, name=name,
    )


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
    from yolo_batch.training.run import train as run_training

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
    from yolo_batch.training.autobatch import estimate_batch
    from yolo_batch.training.run import split_train_args
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
    except (ValueError, FileExistsError) as exc:
        raise InputError(str(exc).replace("pass overwrite=True", "pass --overwrite")) from None
    click.echo(str(data_yaml))


@main.group(invoke_without_command=True)
@click.pass_context
def profiles(ctx: click.Context) -> None:
    """List the built-in profiles with every setting (or print one as YAML with 'profiles show')."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from yolo_batch.profiles import BUILTIN
    from yolo_batch.render import profiles_table

    Console().print(profiles_table(list(BUILTIN.values())))


@profiles.command("show")
@click.argument("profile", metavar="NAME|PATH.yaml")
@command
def profiles_show(profile: str) -> None:
    """Print a profile as YAML: save it, edit it, pass it back with --profile PATH.yaml."""
    from yolo_batch.profiles import load_profile, profile_to_yaml

    click.echo(profile_to_yaml(load_profile(profile)), nl=False)


@main.group()
def bench() -> None:
    """Benchmarks against the Ultralytics baseline, measured in one run."""


@bench.command("autobatch")
@sizing_options
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@command
def bench_autobatch(as_json: bool, **opts: Any) -> None:
    """Ours vs Ultralytics' check_train_batch_size on the same GPU: batch, time, real peak, OOM."""
    from yolo_batch.training.bench import run_autobatch_bench

    config = build_train_config(opts)
    report = run_autobatch_bench(config.sizing)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif report.skipped:
        click.echo(report.skipped)
    else:
        from rich.console import Console

        Console().print(report.table())


# --- infer ---------------------------------------------------------------------------------------------------------


def _parse_classes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[int, ...] | None:
    """``--classes 0,2`` or ``--classes 0 --classes 2``."""
    if not values:
        return None
    from yolo_batch.core.checks import parse_class_ids

    try:
        return tuple(c for value in values for c in parse_class_ids(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def infer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``infer`` and ``bench infer``."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Ultralytics yaml name (random weights) or a local .pt file."),
        click.option("--profile", default=None, metavar="NAME|PATH.yaml",
                     help="default, medical (batch 1), inspection (batch auto, FP16) or a profile file. "
                          "Options given here override it."),
        click.option("--batch", "batch", default=None,
                     help="Images per forward pass: N, or 'auto' (measured: smallest batch within 5% of the best "
                          "img/s that fits --max-latency-ms and the GPU memory). Default: the profile's (16)."),
        click.option("--imgsz", type=int, default=640, show_default=True, help="Long side after letterboxing."),
        click.option("--device", default=None, help="'cpu' or one GPU such as '0'. Default: GPU 0 if present."),
        click.option("--half/--no-half", default=None, help="FP16 (default: on for a GPU, off on CPU)."),
        click.option("--conf", type=float, default=0.25, show_default=True, help="Confidence threshold."),
        click.option("--iou", type=float, default=0.7, show_default=True, help="NMS IoU threshold."),
        click.option("--max-det", type=int, default=300, show_default=True, help="Most detections per image."),
        click.option("--classes", multiple=True, callback=_parse_classes, metavar="IDS",
                     help="Keep only these class ids: '0,2' or repeated."),
        click.option("--workers", type=int, default=None,
                     help="Decode threads. Default: cores-1 with a GPU, cores/4 (at least 1) on CPU."),
        click.option("--threads", type=int, default=None,
                     help="Torch threads per inference stream. Default: 1 on CPU, torch's default on GPU."),
        click.option("--streams", type=int, default=None,
                     help="Inference streams side by side. Default: one per core on CPU (cores / threads), 1 on GPU."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_infer_config(sources: tuple[str, ...], opts: dict[str, Any], **more: Any) -> Any:
    """Map parsed options onto :class:`InferConfig` (raises InputError for bad values)."""
    from yolo_batch.inference import BatchSetting, InferConfig
    from yolo_batch.profiles import infer_settings, load_profile

    profile = load_profile(opts["profile"] or "default")
    settings = infer_settings(profile, batch=opts["batch"], half=opts["half"],
                              max_latency_ms=more.pop("max_latency_ms", None))
    return InferConfig(
        sources=sources, model=opts["model"], batch=BatchSetting.parse(settings["batch"]), imgsz=opts["imgsz"],
        device=opts["device"], half=settings["half"], max_latency_ms=settings["max_latency_ms"],
        image_window=profile.image_window,
        conf=opts["conf"], iou=opts["iou"], max_det=opts["max_det"],
        classes=opts["classes"], workers=opts["workers"], threads=opts["threads"], streams=opts["streams"], **more,
    )


@main.command()
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@infer_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/infer"), show_default=True,
              help="Output folder (results.jsonl, errors.jsonl, summary.json, ...).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["jsonl", "csv", "yolo-txt"]),
              help="Extra result formats, repeatable (results.jsonl is always written: it is the resume journal).")
@click.option("--save-annotated", is_flag=True, help="Write copies of the images with boxes drawn.")
@click.option("--max-latency-ms", type=float, default=None, help="Per-batch latency limit for --batch auto.")
@click.option("--overwrite", is_flag=True, help="Start fresh instead of resuming what --out already holds.")
@click.option("--quiet", is_flag=True, help="No progress and no table (errors still print).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@command
def infer(sources: tuple[str, ...], out: Path, formats: tuple[str, ...], save_annotated: bool,
          max_latency_ms: float | None, overwrite: bool, quiet: bool, as_json: bool, **opts: Any) -> None:
    """Detect objects in SOURCE... (folders, globs, or text files listing images); resumable.

    Rerunning the same command after Ctrl-C or a crash processes only what is missing. Exit code 0 when
    every image was processed, 3 when some files failed (listed in errors.jsonl), 2 for bad usage.
    """
    from rich.console import Console

    from yolo_batch.inference import run_inference
    from yolo_batch.inference.progress import NullProgress, PlainProgress, RichProgress
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    config = build_infer_config(sources, opts, out=out, formats=("jsonl", *formats), save_annotated=save_annotated,
                                max_latency_ms=max_latency_ms, overwrite=overwrite)
    err = Console(stderr=True)
    if quiet:
        progress: Any = NullProgress()
    elif sys.stderr.isatty():
        progress = RichProgress(err)
    else:
        progress = PlainProgress(sys.stderr)
    tables = None if quiet else (err if as_json else Console())
    try:
        with quiet_ultralytics():
            summary = run_inference(config, progress=progress,
                                    on_batch_choice=(lambda c: tables.print(c.table())) if tables else None)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished images are in {out}/results.jsonl; rerun the same command to resume",
                   err=True)
        raise click.exceptions.Exit(130) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    elif tables is not None:
        tables.print(summary.table())
    if summary.exit_code:
        if not as_json:
            click.echo(f"{summary.failed} file(s) failed: see {out}/errors.jsonl", err=True)
        raise click.exceptions.Exit(summary.exit_code)


@bench.command("infer")
@click.argument("source")
@infer_options
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Rounds of the three measurements, interleaved; the best of each counts.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@command
def bench_infer(source: str, repeats: int, as_json: bool, **opts: Any) -> None:
    """Ultralytics predict vs ours vs forward-only ceiling: img/s on the same images, model and device."""
    from rich.console import Console

    from yolo_batch.inference.bench import run_infer_bench
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    config = build_infer_config((source,), opts)
    with quiet_ultralytics():
        report = run_infer_bench(config, repeats=repeats)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(report.table())


# --- serve ---------------------------------------------------------------------------------------------------------


def serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``serve``'s options, one per declared setting (``yolo_batch.serving.config.SETTINGS``); each defaults to
    None (not given), so the environment and the profile can fill it."""
    from yolo_batch.serving.config import SETTINGS, parse_bool

    for item in reversed(SETTINGS):
        if item.parse is parse_bool:
            option = click.option(f"{item.flag}/--no-{item.flag[2:]}", item.name, default=None, help=item.help_text())
        elif item.name == "classes":
            option = click.option(item.flag, multiple=True, callback=_parse_classes, metavar="IDS",
                                  help=item.help_text())
        else:
            kinds: dict[Any, Any] = {int: int, float: float, Path: click.Path(path_type=Path)}
            kind = kinds.get(item.parse)
            option = click.option(item.flag, item.name, default=None, type=kind, help=item.help_text(),
                                  metavar="NAME|PATH.yaml" if item.name == "profile" else None)
        fn = option(fn)
    return fn


@main.command()
@serve_options
@command
def serve(**opts: Any) -> None:
    """Serve detections over HTTP with dynamic batching (and a hot folder with --watch).

    POST /v1/detect with an image body (or multipart files) answers with infer's results.jsonl records;
    GET /healthz, /readyz, /metrics (Prometheus), /v1/info, /openapi.json. Settings also come from
    YOLO_BATCH_* environment variables (an option given here wins). SIGTERM: stop accepting, finish
    queued work within --grace-s, exit 0.
    """
    import logging

    from yolo_batch.serving import resolve
    from yolo_batch.serving import serve as run_service

    opts["classes"] = opts["classes"] or None
    config = resolve(opts)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = run_service(config)
    if code:
        raise click.exceptions.Exit(code)


@bench.command("serve")
@click.argument("source")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="A local .pt file or an Ultralytics yaml name.")
@click.option("--imgsz", type=int, default=640, show_default=True)
@click.option("--device", default=None, help="'cpu' or one GPU such as '0'. Default: GPU 0 if present.")
@click.option("--max-batch", default="16", show_default=True,
              help="The service's max batch, N or auto; offline infer runs at the batch the service ran.")
@click.option("--max-delay-ms", type=float, default=5.0, show_default=True)
@click.option("--requests", type=int, default=400, show_default=True, help="Timed requests (one image each).")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Client threads, each with a connection.")
@click.option("--warmup", "warmup_requests", type=int, default=32, show_default=True, help="Untimed requests first.")
@click.option("--offline-rounds", type=int, default=2, show_default=True, help="Offline infer runs; the best counts.")
@click.option("--workers", type=int, default=None, help="Decode threads (both sides).")
@click.option("--threads", type=int, default=None, help="Torch threads per inference stream (both sides).")
@click.option("--streams", type=int, default=None, help="Inference streams (both sides).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@command
def bench_serve(source: str, as_json: bool, **opts: Any) -> None:
    """A bounded load on 'yolo-batch serve' over loopback vs offline infer on the same images."""
    from rich.console import Console

    from yolo_batch.serving.bench import ServeBenchConfig, run_serve_bench
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    config = ServeBenchConfig(source=source, **opts)
    err = Console(stderr=True)
    with quiet_ultralytics():
        report = run_serve_bench(config, on_stage=None if as_json else (lambda text: err.print(f"bench serve: {text}")))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(report.table())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
