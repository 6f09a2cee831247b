"""``serve`` and ``bench serve``: the detection service from the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from yolo_batch.cli.common import command, parse_classes
from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.inference.runtimes.choice import BACKENDS, PRECISIONS


def serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``serve``'s options, one per declared setting (``yolo_batch.serving.config.SETTINGS``); each defaults to
    None (not given), so the environment and the profile can fill it."""
    from yolo_batch.serving.config import SETTINGS, parse_bool

    for item in reversed(SETTINGS):
        if item.parse is parse_bool:
            option = click.option(f"{item.flag}/--no-{item.flag[2:]}", item.name, default=None, help=item.help_text())
        elif item.name == "classes":
            option = click.option(item.flag, multiple=True, callback=parse_classes, metavar="IDS",
                                  help=item.help_text())
        else:
            kinds: dict[Any, Any] = {int: int, float: float, Path: click.Path(path_type=Path)}
            kind = kinds.get(item.parse)
            option = click.option(item.flag, item.name, default=None, type=kind, help=item.help_text(),
                                  metavar="NAME|PATH.yaml" if item.name == "profile" else None)
        fn = option(fn)
    return fn


@click.command()
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


@click.command("serve")
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
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Runtime (both sides), as serve and infer.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Precision (both sides), as serve and infer.")
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
