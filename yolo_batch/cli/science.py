"""``sweep`` and ``advise``: batch-size science from the command line (parse, one library call, render)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import click

from yolo_batch.cli.common import command, with_options
from yolo_batch.cli.train import DATA, DEVICE, IMGSZ, LR_SCALING, MODEL, PROFILE, SET, quiet_option


def _shared(fn: Any) -> Any:
    """The options that describe the training run (declared once, in cli/train.py)."""
    return with_options(
        fn, MODEL, DATA, PROFILE, IMGSZ, DEVICE,
        click.option("--nominal-batch", type=int, default=None,
                     help="The batch lr0 is tuned for; each batch's lr0 is scaled from it. Default: the profile's."),
        LR_SCALING, SET)


def _config(opts: dict[str, Any], epochs: int, batch: str | None = None) -> Any:
    from yolo_batch.api import build_train_config

    return build_train_config(model=opts["model"], data=opts["data"], profile=opts["profile"], imgsz=opts["imgsz"],
                              device=opts["device"], nominal_batch=opts["nominal_batch"],
                              lr_scaling=opts["lr_scaling"], epochs=epochs, batch=batch, extra=opts["extra"])


@click.command()
@_shared
@click.option("--batches", default="auto", show_default=True, metavar="auto|B,B,...",
              help="Batches to train at, e.g. 8,32,128; auto: a small, a middle and the AutoBatch limit "
                   "(8,16,32 on CPU).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs per run.")
@click.option("--seed", type=int, default=0, show_default=True, help="The seed every run trains with.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/sweep"),
              show_default=True, help="Where runs, sweep.json, sweep.csv and the plots go; a rerun resumes.")
@quiet_option
@command
def sweep(batches: str, epochs: int, seed: int, out: Path, quiet: bool, **opts: Any) -> None:
    """Train the same run at several batch sizes (lr0 scaled, no accumulation) and compare them."""
    from yolo_batch.core.progress import reporter_for
    from yolo_batch.render import print_sweep
    from yolo_batch.training.sweep import SweepConfig, parse_batches, run_sweep
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    parsed = parse_batches(batches)
    base = _config(opts, epochs)
    config = SweepConfig(base=base, batches=parsed, out=out, seed=seed)
    with quiet_ultralytics() if quiet else contextlib.nullcontext():
        report = run_sweep(config, progress=reporter_for(quiet))
    if not quiet:
        print_sweep(report)
    click.echo(f"recommendation: {report.recommendation}")
    click.echo(report.gap_note)
    click.echo(f"results: {out / 'sweep.json'}, {out / 'sweep.csv'} and plots in {out}")


@click.command()
@_shared
@click.option("--batch", default=None, help="-1 or a memory fraction such as 0.8 for the memory limit. Default: -1.")
@click.option("--epochs", type=int, default=100, show_default=True,
              help="The epochs you will train (Ultralytics' optimizer=auto depends on them).")
@click.option("--small-batch", type=int, default=4, show_default=True, help="The small of the two batch sizes.")
@click.option("--chunks", type=int, default=8, show_default=True,
              help="Small batches per step; the big batch is small-batch x chunks.")
@click.option("--steps", type=int, default=30, show_default=True, help="Steps measured (more: a tighter interval).")
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON only.")
@quiet_option
@command
def advise(batch: str | None, epochs: int, small_batch: int, chunks: int, steps: int, as_json: bool, quiet: bool,
           **opts: Any) -> None:
    """Recommend a batch, accumulation and lr0 from the gradient noise scale and the memory limit."""
    from yolo_batch.core.progress import reporter_for
    from yolo_batch.training.advise import advise as run_advise
    from yolo_batch.training.noise_scale import NoiseSettings
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    noise = NoiseSettings(small_batch=small_batch, chunks=chunks, steps=steps)
    config = _config(opts, epochs, batch)
    with quiet_ultralytics() if quiet or as_json else contextlib.nullcontext():
        advice = run_advise(config.sizing, noise, progress=reporter_for(quiet or as_json))
    if as_json:
        click.echo(json.dumps(advice.to_dict(), indent=2))
        return
    if not quiet:
        from yolo_batch.render import print_advice

        print_advice(advice)
    click.echo(advice.summary())
