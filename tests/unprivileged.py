"""Running a check as an unprivileged user: root passes every permission check, so tests that need a refusal
fork a child switched to uid/gid 65534 ('nobody')."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from yolo_batch.errors import InputError


def as_nobody(fn: Callable[[], Any]) -> Any:
    """``fn()`` as an unprivileged user: root reads and writes through permission bits, users do not.

    Forked, so the child shares the imported modules; the result comes back as JSON through a pipe.
    """
    if os.geteuid() != 0:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            payload = json.dumps({"value": fn()})
            status = 0
        except BaseException as exc:  # noqa: BLE001 (reported to the parent, which fails the test)
            payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        try:
            with os.fdopen(write_end, "w") as handle:
                handle.write(payload)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as handle:
        answer = json.loads(handle.read() or '{"error": "no answer"}')
    os.waitpid(pid, 0)
    assert "error" not in answer, answer["error"]
    return answer["value"]


def refusal_as_nobody(check: Callable[[], Any]) -> str:
    """The InputError message ``check()`` raises as 'nobody' ('' when it raises none)."""
    def run() -> str:
        try:
            check()
        except InputError as exc:
            return str(exc)
        return ""

    return as_nobody(run)
