"""``serve(config)``: bind, load the model, run uvicorn; SIGTERM (or Ctrl-C) drains and returns 0.

Order: the port is bound and the model loaded **before** anything is served, so a port in use, a missing
model or an unknown device is one line and exit code 2. Warm-up (and ``--max-batch auto``) runs in the
background while /healthz already answers.

On SIGTERM: new requests get 503 and /readyz says so, the listening socket closes, queued images are
processed for up to the grace period (the rest get 503), uvicorn waits for their answers to be sent, then
the hot folder journals what finished. uvicorn re-raises the signal once it is done; the handler this
module installs around it takes that signal, so the process exits 0 instead of dying by the signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from yolo_batch.core.checks import nearest_existing, on_read_only_file_system
from yolo_batch.errors import InputError
from yolo_batch.serving.app import create_app
from yolo_batch.serving.backend import DetectorBackend
from yolo_batch.serving.config import ServeConfig
from yolo_batch.serving.journal import DONE, ERRORS, FAILED, RESULTS
from yolo_batch.serving.state import BackendFactory, ServiceState

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_SEND_SLACK_S = 10.0  # after the grace period, time for the last answers to be written


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: any free port).

    Raises:
        InputError: the address cannot be bound (in use, not ours, no permission).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def check_hot_folder_access(watch: Path, out: Path) -> None:
    """Fail at start, in one line, where the hot folder could not move a file or append to its journal.

    A folder that Docker created for a bind mount belongs to root, while the image runs as uid 10001; found
    only when the first file arrives, that is a traceback in a restart loop instead of one line saying what
    to change.

    Raises:
        InputError: ``watch`` (or its done/, failed/), ``out`` (or the folder it would be created in) or a
            journal file in it is not writable by this process, is on a read-only file system, or is a file
            where a folder goes (or the reverse).
    """
    if not watch.is_dir():
        raise InputError(f"--watch {watch} is not a folder")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    for folder in (watch / DONE, watch / FAILED):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is not a folder: the hot folder moves files into it")
    for name in (RESULTS, ERRORS):
        if (out / name).is_dir():
            raise InputError(f"{out / name} is a folder: the hot folder appends its journal lines to a file there")
    needed = [(watch, os.R_OK | os.W_OK | os.X_OK)]
    needed += [(watch / name, os.W_OK | os.X_OK) for name in (DONE, FAILED) if (watch / name).is_dir()]
    needed.append((nearest_existing(out), os.W_OK | os.X_OK))  # out is created at start when missing
    needed += [(out / name, os.R_OK | os.W_OK) for name in (RESULTS, ERRORS) if (out / name).is_file()]
    for folder, mode in needed:
        if not os.access(folder, mode):
            if on_read_only_file_system(folder):
                raise InputError(f"{folder} is not writable: it is on a read-only file system (mount it read-write)")
            uid, gid = os.getuid(), os.getgid()
            raise InputError(f"{folder} is not writable by this process (uid {uid}, gid {gid}): give it that owner, "
                             f"e.g. sudo chown -R {uid}:{gid} on the host folder mounted there")


def uvicorn_config(app: Any, config: ServeConfig) -> uvicorn.Config:
    """How uvicorn runs the app: our logging, the drain's time, the bound on open connections."""
    return uvicorn.Config(app, lifespan="on", log_config=None, access_log=False,
                          log_level=config.log_level.lower(),
                          timeout_graceful_shutdown=int(config.grace_s + _SEND_SLACK_S),
                          # uvicorn refuses at ">= limit", counting the new connection itself
                          limit_concurrency=config.max_connections + 1)


class _Server(uvicorn.Server):
    """uvicorn's server, plus: a signal starts the service's drain at once; a failed start ends it."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.begin_shutdown()
        super().handle_exit(sig, frame)

    def fatal(self, exc: BaseException) -> None:
        self.exit_code = 2 if isinstance(exc, InputError) else 1
        self.should_exit = True


class _SignalLatch:
    """Records SIGTERM/SIGINT outside uvicorn's own handling (model loading, and uvicorn's re-raise at the end)."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, sig: int, frame: FrameType | None) -> None:
        self.received.append(sig)


@contextlib.contextmanager
def _latched_signals() -> Iterator[_SignalLatch]:
    latch = _SignalLatch()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield latch
        return
    previous = {sig: signal.signal(sig, latch) for sig in _SIGNALS}
    try:
        yield latch
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: ServeConfig, backend_factory: BackendFactory = DetectorBackend.load) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0 after a drain, 1 or 2 when the start failed).

    Raises:
        InputError: the address cannot be bound, or the model or device is bad.
    """
    sock = bind(config.host, config.port)
    backend: Any = None
    served = False
    try:
        with _latched_signals() as latch:
            # Folders first: a refusal is then the only line a bad start prints (loading logs the runtime choice
            # and can take minutes).
            if config.watch is not None and config.out is not None:
                check_hot_folder_access(config.watch, config.out)
            backend = backend_factory(config)  # a bad model fails here, before anything is served
            if latch.received:
                log.info("signal received while loading: not starting")
                return 0
            loaded = backend
            app = create_app(config, lambda _: loaded)
            state: ServiceState = app.state.service
            server = _Server(uvicorn_config(app, config), state)
            state.on_fatal = server.fatal
            port = sock.getsockname()[1]
            log.info("listening on http://%s:%d (model %s)", config.host, port, config.model)
            if config.token is None and config.host not in {"127.0.0.1", "localhost", "::1"}:
                log.warning("listening on %s without a token: anyone who reaches the port can use the service",
                            config.host)
            served = True
            server.run(sockets=[sock])  # closes the backend through the app's lifespan
            return server.exit_code
    finally:
        sock.close()
        if backend is not None and not served:
            backend.close()
