"""The ``yolo-batch`` command: parse, build a typed config, make one library call, render.

One module per product part (:mod:`.train`, :mod:`.infer`, :mod:`.serve`, :mod:`.science`, :mod:`.catalog`);
:mod:`.common` maps library errors to one line and an exit code. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import click

from yolo_batch import __version__
from yolo_batch.cli import catalog, infer, science, serve, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="yolo-batch")
def main() -> None:
    """Batch size as a solved problem for Ultralytics YOLO."""


@main.group()
def bench() -> None:
    """Benchmarks against the Ultralytics baseline, measured in one run."""


for _command in (train.train, train.autobatch, train.demo, catalog.datasets, catalog.profiles, infer.infer,
                 serve.serve, science.sweep, science.advise):
    main.add_command(_command)
for _name, _command in (("autobatch", train.bench_autobatch), ("infer", infer.bench_infer),
                        ("serve", serve.bench_serve), ("accuracy", infer.bench_accuracy)):
    bench.add_command(_command, _name)

