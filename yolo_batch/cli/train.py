"""``train``, ``autobatch``, ``bench autobatch`` and ``demo``: the training AutoBatch from the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from yolo_batch.cli.common import command, parse_set, with_options
from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.errors import InputError
from yolo_batch.training.config import BnPolicy, LrScaling, Rounding, TrainConfig


def quiet_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--quiet", is_flag=True,
                        help="No progress (dataset scan, probes, inference) and no tables; errors still print.")(fn)


# The training run's options, each declared once: train, autobatch and bench autobatch take them all (below), sweep
# and advise the ones that describe a run (cli/science.py).
MODEL = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Ultralytics yaml name (yolo11n.yaml, yolo11s.yaml, ...) or a local .pt file.")
DATA = click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
                    help="Data yaml in YOLO layout. Default: the built-in synthetic 'shapes' set.")
PROFILE = click.option("--profile", default=None, metavar="NAME|PATH.yaml",
                       help="default, medical, inspection or a profile file ('yolo-batch profiles'). "
                            "Options given here override it. Default: default.")
IMGSZ = click.option("--imgsz", type=int, default=None,
                     help="Training image size (multiple of 32). Default: the profile's (640; medical 1024).")
DEVICE = click.option("--device", default=None, help="'cpu', '0' or '0,1'. Default: GPU 0 if present, else CPU.")
LR_SCALING = click.option("--lr-scaling", type=click.Choice([r.value for r in LrScaling]), default=None,
                          help="lr0 rule when the effective batch differs from the nominal one "
                               "(auto: linear for SGD, sqrt for Adam-family). Default: the profile's (auto).")
SET = click.option("--set", "extra", multiple=True, callback=parse_set, metavar="KEY=VALUE",
                   help="Any other Ultralytics train argument, repeatable (e.g. --set optimizer=SGD).")


def sizing_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``train``, ``autobatch`` and ``bench autobatch``."""
    return with_options(
        fn, MODEL, DATA, PROFILE, IMGSZ, DEVICE,
        click.option("--batch", "batch", default=None,
                     help="N (fixed), -1 (AutoBatch) or a memory fraction such as 0.7. Default: -1."),
        click.option("--auto", "auto", is_flag=True, help="AutoBatch, same as --batch -1."),
        click.option("--round", "rounding", type=click.Choice([r.value for r in Rounding]), default=None,
                     help="How the AutoBatch result is rounded down. Default: the profile's (pow2)."),
        click.option("--nominal-batch", type=int, default=None,
                     help="Batch the learning rate is tuned for (Ultralytics nbs); gradients accumulate to it. "
                          "Default: the profile's (64)."),
        LR_SCALING,
        click.option("--bn", type=click.Choice([p.value for p in BnPolicy]), default=None,
                     help="BatchNorm during training: freeze keeps running statistics, sync uses SyncBatchNorm "
                          "across GPUs, auto decides from the batch (below 8 per device). Default: the profile's "
                          "(auto)."),
        click.option("--epochs", type=int, default=100, show_default=True),
        click.option("--no-cache", is_flag=True, help="Re-measure instead of reusing a cached decision."),
        SET)


def build_train_config(opts: dict[str, Any], project: str | None = None, name: str | None = None) -> TrainConfig:
    """Map parsed options onto the typed configs (raises InputError for bad values)."""
    if opts["auto"] and opts["batch"] not in (None, "-1"):
        raise InputError(f"--auto and --batch {opts['batch']} disagree: give one of them")
    from yolo_batch.api import build_train_config as build

    return build(model=opts["model"], data=opts["data"], profile=opts["profile"], imgsz=opts["imgsz"],
                 device=opts["device"], batch=opts["batch"], rounding=opts["rounding"],
                 nominal_batch=opts["nominal_batch"], lr_scaling=opts["lr_scaling"], bn=opts["bn"],
                 epochs=opts["epochs"], cache=not opts["no_cache"], extra=opts["extra"], project=project, name=name)


@click.command()
@sizing_options
@click.option("--project", default=None, help="Ultralytics project folder (runs/detect by default).")
@click.option("--name", default=None, help="Run name inside the project folder.")
@click.option("--batch-schedule", default=None, metavar="B@E,...|auto",
              help="Grow the batch during training: '16@0,32@10,64@20' (total batch from that epoch, counted from "
                   "0; each phase's effective batch, lr0 scaled by --lr-scaling) or 'auto' (a quarter of the "
                   "AutoBatch limit, doubled at 25 % and 50 % of the epochs).")
@click.option("--no-oom-recovery", is_flag=True,
              help="Stop on a GPU out-of-memory error instead of stepping the batch down (accumulation keeps the "
                   "effective batch) and going on from the same epoch.")
@click.option("--log-noise-scale", is_flag=True,
              help="Measure the gradient noise scale after every epoch into noise_scale.json in the run folder "
                   "(10 steps of 8 gradients at batch 4 each, on a copy of the model; see 'yolo-batch advise').")
@quiet_option
@command
def train(project: str | None, name: str | None, batch_schedule: str | None, no_oom_recovery: bool,
          log_noise_scale: bool, quiet: bool, **opts: Any) -> None:
    """Train with an AutoBatch decision (printed, and saved as autobatch.json in the run folder).

    A GPU out-of-memory error during training or validation steps the batch down and goes on (each change is an
    event in autobatch.json); YOLO_BATCH_INJECT_OOM="train:epoch=2,step=3" rehearses one (see the README).
    """
    from yolo_batch.core.progress import reporter_for
    from yolo_batch.render import print_decision, print_train_result
    from yolo_batch.training.noise_scale import NoiseSettings
    from yolo_batch.training.run import train as run_training
    from yolo_batch.training.schedule import ScheduleRequest
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    schedule = ScheduleRequest.parse(batch_schedule) if batch_schedule is not None else None
    config = dataclasses.replace(build_train_config(opts, project, name), batch_schedule=schedule,
                                 oom_recovery=not no_oom_recovery,
                                 log_noise_scale=NoiseSettings(steps=10) if log_noise_scale else None)
    with quiet_ultralytics() if quiet else contextlib.nullcontext():
        result = run_training(config, on_decision=None if quiet else print_decision, progress=reporter_for(quiet))
    print_train_result(result)


@click.command()
@sizing_options
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON only.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the memory probes and the choice into this PNG (when GPU memory was measured).")
@quiet_option
@command
def autobatch(as_json: bool, plot: Path | None, quiet: bool, **opts: Any) -> None:
    """Estimate the training batch only (no training)."""
    from yolo_batch.api import autobatch as decide
    from yolo_batch.core.progress import reporter_for
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    config = build_train_config(opts)
    with quiet_ultralytics() if as_json or quiet else contextlib.nullcontext():
        decision = decide(config, progress=reporter_for(quiet))
    if plot is not None:
        from yolo_batch.training.plots import save_autobatch_plot

        written = save_autobatch_plot(decision, plot)
        if not quiet and not as_json:
            click.echo(f"plot: {written}" if written else f"plot: not written ({plot}): no GPU memory was measured",
                       err=True)
    if as_json:
        click.echo(decision.to_json())
    elif not quiet:
        from yolo_batch.render import print_decision

        print_decision(decision)


@click.command()
@click.option("--epochs", type=int, default=None,
              help="Training epochs. Default: the demo's 12 (reaches mAP50 >= 0.5 on a 2-core CPU; README).")
@click.option("--device", default=None, help="'cpu' or one GPU such as '0'. Default: GPU 0 if present, else CPU.")
@click.option("--project", default="runs/demo", show_default=True, help="Where the run folder goes.")
@quiet_option
@command
def demo(epochs: int | None, device: str | None, project: str, quiet: bool) -> None:
    """Train yolo11n on the built-in big-shapes set until it detects, then infer on its validation images with
    annotated copies, and say where to look (what 'make demo' runs)."""
    from rich.console import Console

    from yolo_batch.core.progress import reporter_for
    from yolo_batch.demo import DemoConfig, run_demo
    from yolo_batch.render import print_decision
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    config = DemoConfig(device=device, project=project)
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    reporter = reporter_for(quiet)
    err = Console(stderr=True)
    with quiet_ultralytics() if quiet else contextlib.nullcontext():
        result = run_demo(config, on_decision=None if quiet else print_decision, progress=reporter,
                          infer_progress=reporter.task("infer", failures=True),
                          on_batch_choice=None if quiet else (lambda c: err.print(c.table())))
    if not quiet:
        err.print(result.infer.table())
    for line in result.lines():
        click.echo(line)


@click.command("autobatch")
@sizing_options
@click.option("--shared-gpu", is_flag=True,
              help="Stress mode: a co-tenant process takes most of the free memory mid-run; reports runs finished / "
                   "runs started for yolo-batch and Ultralytics' AutoBatch at the same memory fraction (--batch).")
@click.option("--runs", type=int, default=3, show_default=True, help="--shared-gpu: runs per method, interleaved.")
@click.option("--cotenant-share", type=float, default=0.9, show_default=True,
              help="--shared-gpu: share of the free memory the co-tenant takes.")
@click.option("--cotenant-epoch", type=int, default=2, show_default=True,
              help="--shared-gpu: the epoch at whose start it takes it (each run trains one epoch more).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@command
def bench_autobatch(shared_gpu: bool, runs: int, cotenant_share: float, cotenant_epoch: int, as_json: bool,
                    **opts: Any) -> None:
    """Ours vs Ultralytics' check_train_batch_size on the same GPU: batch, time, real peak, OOM."""
    config = build_train_config(opts)
    report: Any
    if shared_gpu:
        from yolo_batch.training.stress import run_stress_bench

        report = run_stress_bench(config.sizing, runs=runs, share=cotenant_share, at_epoch=cotenant_epoch)
    else:
        from yolo_batch.training.bench import run_autobatch_bench

        report = run_autobatch_bench(config.sizing)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif report.skipped:
        click.echo(report.skipped)
    else:
        from rich.console import Console

        Console().print(report.table())
