"""Exceptions the library raises for problems a user can fix; each class carries its exit code.

The CLI maps any :class:`YoloBatchError` to one line on stderr and ``exit_code`` (in one place,
``yolo_batch.cli``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class YoloBatchError(Exception):
    """Base class for yolo-batch errors that carry a user-facing, one-line message (exit code 1)."""

    exit_code = 1


class InputError(YoloBatchError, ValueError):
    """Bad input from the user: a path, a model name, a batch value, a device, a setting (exit code 2)."""

    exit_code = 2
