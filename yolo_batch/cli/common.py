"""What every command shares: library errors as one line and an exit code, and option parsers."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import click
import yaml

from yolo_batch.errors import YoloBatchError


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


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body with library errors mapped to one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with library_errors():
            return fn(*args, **kwargs)

    return wrapper


def parse_classes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[int, ...] | None:
    """``--classes 0,2`` or ``--classes 0 --classes 2``."""
    if not values:
        return None
    from yolo_batch.core.checks import parse_class_ids

    try:
        return tuple(c for value in values for c in parse_class_ids(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def with_options(fn: Callable[..., Any], *options: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with ``options`` in the order given (in --help too)."""
    for option in reversed(options):
        fn = option(fn)
    return fn
