"""Exceptions the library raises for problems a user can fix.

The CLI turns :class:`InputError` into one line and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class YoloBatchError(Exception):
    """Base class for yolo-batch errors that carry a user-facing, one-line message."""


class InputError(YoloBatchError, ValueError):
    """Bad input from the user: a path, a model name, a batch value, a device, a setting."""
