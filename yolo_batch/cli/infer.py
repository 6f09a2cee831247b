"""``infer`` and ``bench infer``: batch inference from the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from yolo_batch.cli.common import command, parse_classes, with_options
from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.inference.runtimes.choice import BACKENDS, PRECISIONS


def infer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``infer`` and ``bench infer``."""
    return with_options(
        fn,
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
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="Runtime: auto picks TensorRT on an NVIDIA GPU, OpenVINO on an x86 CPU (when installed), "
                          "else torch. Exported runtimes export the model once and cache it."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="auto: fp16 on a GPU, bf16 on a CPU that has it, else fp32."),
        click.option("--no-cache", is_flag=True, help="Export again instead of reusing a cached export."),
        click.option("--half/--no-half", default=None,
                     help="Older switch: --no-half is --precision fp32; --half leaves precision auto."),
        click.option("--conf", type=float, default=0.25, show_default=True, help="Confidence threshold."),
        click.option("--iou", type=float, default=0.7, show_default=True, help="NMS IoU threshold."),
        click.option("--max-det", type=int, default=300, show_default=True, help="Most detections per image."),
        click.option("--classes", multiple=True, callback=parse_classes, metavar="IDS",
                     help="Keep only these class ids: '0,2' or repeated."),
        click.option("--workers", type=int, default=None,
                     help="Decode threads. Default: cores-1 with a GPU, cores/4 (at least 1) on CPU."),
        click.option("--threads", type=int, default=None,
                     help="Torch threads per inference stream. Default: 1 on CPU, torch's default on GPU."),
        click.option("--streams", type=int, default=None,
                     help="Inference streams side by side. Default: one per core on CPU (cores / threads), 1 on GPU."),
    )


def cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--cluster``, ``--actors`` and ``--gpus-per-actor`` (``infer`` and ``bench infer``)."""
    return with_options(
        fn,
        click.option("--cluster", default=None, metavar="ray[:ADDRESS]",
                     help="Run on a Ray cluster through Ray Data: 'ray' joins RAY_ADDRESS or starts a local one, "
                          "'ray:ADDRESS' joins that one. Needs the extra: pip install 'yolo-batch[ray]'."),
        click.option("--actors", type=int, default=None,
                     help="With --cluster: inference actors. Default: one per GPU, or 3/4 of the CPUs."),
        click.option("--gpus-per-actor", type=float, default=None,
                     help="With --cluster: GPUs per actor (0: CPU actors; 0.5: two per GPU). Default: 1 with GPUs."),
    )


def build_cluster_config(opts: dict[str, Any]) -> Any:
    """``--cluster`` and its options as a ClusterConfig, or None (raises InputError for bad values)."""
    from yolo_batch.api import build_cluster_config as build

    return build(opts["cluster"], opts["actors"], opts["gpus_per_actor"])


def build_infer_config(sources: tuple[str, ...], opts: dict[str, Any], **more: Any) -> Any:
    """Map parsed options onto :class:`InferConfig` (raises InputError for bad values)."""
    from yolo_batch.api import build_infer_config as build

    opts = {k: v for k, v in opts.items() if k not in {"cluster", "actors", "gpus_per_actor"}}
    return build(sources, model=opts["model"], profile=opts["profile"], batch=opts["batch"], half=opts["half"],
                 imgsz=opts["imgsz"], device=opts["device"], conf=opts["conf"], iou=opts["iou"],
                 max_det=opts["max_det"], classes=opts["classes"], workers=opts["workers"], threads=opts["threads"],
                 streams=opts["streams"], backend=opts["backend"], precision=opts["precision"],
                 use_cache=not opts["no_cache"], **more)


@click.command()
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
@cluster_options
@command
def infer(sources: tuple[str, ...], out: Path, formats: tuple[str, ...], save_annotated: bool,
          max_latency_ms: float | None, overwrite: bool, quiet: bool, as_json: bool, **opts: Any) -> None:
    """Detect objects in SOURCE... (folders, globs, or text files listing images); resumable.

    Rerunning the same command after Ctrl-C or a crash processes only what is missing. Exit code 0 when
    every image was processed, 3 when some files failed (listed in errors.jsonl), 2 for bad usage.
    """
    from rich.console import Console

    from yolo_batch.core.progress import reporter_for
    from yolo_batch.inference import run_inference
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    cluster = build_cluster_config(opts)
    config = build_infer_config(sources, opts, out=out, formats=("jsonl", *formats), save_annotated=save_annotated,
                                max_latency_ms=max_latency_ms, overwrite=overwrite)
    err = Console(stderr=True)
    reporter = reporter_for(quiet)
    progress = reporter.task("infer", failures=True)
    tables = None if quiet else (err if as_json else Console())
    try:
        with quiet_ultralytics():
            if cluster is not None:
                from yolo_batch.inference.cluster import run_cluster_inference

                summary = run_cluster_inference(config, cluster, progress=progress, on_note=reporter.note)
            else:
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


@click.command("infer")
@click.argument("source")
@infer_options
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Rounds of the three measurements, interleaved; the best of each counts.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@cluster_options
@command
def bench_infer(source: str, repeats: int, as_json: bool, **opts: Any) -> None:
    """Ultralytics predict vs ours vs forward-only ceiling: img/s on the same images, model and device.

    With an exported runtime (--backend openvino ...) also Ultralytics predict on the same export, and the
    ceiling is that runtime's own forward pass. With --cluster: local infer vs the cluster path instead.
    """
    from rich.console import Console

    from yolo_batch.inference.bench import run_infer_bench
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    cluster = build_cluster_config(opts)
    config = build_infer_config((source,), opts)
    with quiet_ultralytics():
        if cluster is not None:
            from yolo_batch.inference.cluster import run_cluster_bench

            report: Any = run_cluster_bench(config, cluster, repeats=repeats)
        else:
            report = run_infer_bench(config, repeats=repeats)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(report.table())


@click.command("accuracy")
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Trained weights (.pt) to score.")
@click.option("--runtime", "runtimes", multiple=True, metavar="BACKEND:PRECISION",
              help="A runtime to score, e.g. openvino:bf16 (repeatable); default: every one this machine runs. "
                   "torch:fp32 always runs first, as the reference.")
@click.option("--imgsz", type=int, default=640, show_default=True, help="Inference image size.")
@click.option("--batch", type=int, default=16, show_default=True, help="Images per batch.")
@click.option("--device", default=None, help="cpu or one GPU index (default: the first GPU, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@command
def bench_accuracy(images: Path, model: str, runtimes: tuple[str, ...], imgsz: int, batch: int, device: str | None,
                   as_json: bool) -> None:
    """mAP and agreement with torch fp32 of each runtime and precision, through infer itself.

    IMAGES is a labelled split's images folder (images/val; labels in labels/val). The contract: fp32 runtimes
    give torch fp32's boxes within 1 px; bf16/fp16 keep >= 98 % of the detections above conf 0.25 (same class,
    IoU >= 0.9, both ways). Exit code 1 when a runtime misses it.
    """
    from rich.console import Console

    from yolo_batch.inference.accuracy_bench import AccuracyBenchConfig, parse_runtime, run_accuracy_bench
    from yolo_batch.ultralytics_adapter import quiet as quiet_ultralytics

    config = AccuracyBenchConfig(images=str(images), model=model, runtimes=tuple(parse_runtime(r) for r in runtimes),
                                 imgsz=imgsz, device=device, batch=batch)
    err = Console(stderr=True)
    with quiet_ultralytics():
        report = run_accuracy_bench(config, on_runtime=None if as_json else (
            lambda row: err.print(f"bench accuracy: {row.runtime} done")))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(report.table())
    if not report.all_meet:
        raise click.exceptions.Exit(1)
