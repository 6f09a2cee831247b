"""``train``, ``autobatch`` and ``bench autobatch``: the training AutoBatch from the command line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from yolo_batch.cli.common import command, parse_set
from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.errors import InputError
from yolo_batch.training.config import BatchRequest, BnPolicy, LrScaling, Rounding, TrainConfig


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
@command
def train(project: str | None, name: str | None, batch_schedule: str | None, no_oom_recovery: bool,
          **opts: Any) -> None:
    """Train with an AutoBatch decision (printed, and saved as autobatch.json in the run folder).

    A GPU out-of-memory error during training or validation steps the batch down and goes on (each change is an
    event in autobatch.json); YOLO_BATCH_INJECT_OOM="train:epoch=2,step=3" rehearses one (see the README).
    """
    import dataclasses

    from yolo_batch.render import print_decision
    from yolo_batch.training.run import train as run_training
    from yolo_batch.training.schedule import ScheduleRequest

    schedule = ScheduleRequest.parse(batch_schedule) if batch_schedule is not None else None
    config = dataclasses.replace(build_train_config(opts, project, name), batch_schedule=schedule,
                                 oom_recovery=not no_oom_recovery)
    result = run_training(config, on_decision=print_decision)
    click.echo(f"run folder: {result.save_dir}")
    click.echo(f"decision:   {result.decision_path}")
    if result.weights is not None:
        click.echo(f"weights:    {result.weights}")


@click.command()
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
