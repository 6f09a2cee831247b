"""``datasets`` and ``profiles``: what is built in, listed, shown and made."""

from __future__ import annotations

from pathlib import Path

import click

from yolo_batch.cli.common import command
from yolo_batch.errors import InputError


@click.group(invoke_without_command=True)
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


@click.group(invoke_without_command=True)
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
