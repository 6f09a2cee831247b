"""Hostile clients and hostile folders: a client gone mid-upload, a slow upload, too many connections, a hot folder
the service cannot write. Over real HTTP on 127.0.0.1 with a fake backend; every wait has a deadline."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from serving_fixtures import FakeBackend, LiveServer, fake_config, until
from unprivileged import as_nobody

from yolo_batch.cli import main
from yolo_batch.errors import InputError
from yolo_batch.serving.config import resolve
from yolo_batch.serving.server import serve

SOCKET_S = 30.0  # a guard against a hang, never a measured time
PARTIAL = (b"POST /v1/detect HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n"
           b"abc")


def partial_upload(port: int) -> socket.socket:
    """A connection that sent headers promising 5000 bytes, then three of them."""
    client = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_S)
    client.sendall(PARTIAL)
    return client


def read_to_close(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def errors_by_kind(server: LiveServer) -> dict[str, float]:
    prefix = 'yolo_batch_errors_total{kind="'
    return {key[len(prefix):-2]: value for key, value in server.metrics().items() if key.startswith(prefix)}


def test_a_client_gone_mid_upload_is_a_disconnect_not_an_internal_error(caplog):
    with LiveServer(fake_config(), FakeBackend) as server:
        server.wait_ready()
        with caplog.at_level(logging.INFO):
            partial_upload(server.port).close()
            kinds = until(lambda: errors_by_kind(server), what="the upload counted")
        assert kinds == {"client-disconnect": 1}
        statuses = {k: v for k, v in server.metrics().items()
                    if k.startswith('yolo_batch_http_requests_total{route="/v1/detect"')}
        assert statuses == {'yolo_batch_http_requests_total{route="/v1/detect",status="499"}': 1}
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_slow_upload_is_answered_408_at_the_read_timeout_and_closed():
    with LiveServer(fake_config(read_timeout_s=0.2), FakeBackend) as server:
        server.wait_ready()
        with partial_upload(server.port) as client:
            answer = read_to_close(client)  # the server closes the connection: recv returns b""
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b'"error":"read-timeout"' in body
        assert b"0.2 s" in body
        assert errors_by_kind(server) == {"read-timeout": 1}


def test_connections_beyond_the_bound_are_refused_and_served_again_once_they_close():
    with LiveServer(fake_config(max_connections=2, read_timeout_s=SOCKET_S), FakeBackend) as server:
        server.wait_ready()
        held = [partial_upload(server.port) for _ in range(2)]
        until(lambda: len(server.server.server_state.connections) == 2, what="two connections held")
        with server.client() as client:
            assert client.get("/healthz").status_code == 503
            for sock in held:
                sock.close()
            until(lambda: client.get("/healthz").status_code == 200, what="served again")


def test_read_timeout_and_connection_bound_come_from_options_and_the_environment():
    config = resolve({"model": "m.pt", "max_connections": 64},
                     environ={"YOLO_BATCH_READ_TIMEOUT_S": "7.5"})
    assert (config.read_timeout_s, config.max_connections) == (7.5, 64)
    assert resolve({"model": "m.pt"}, environ={}).read_timeout_s == 30.0
    with pytest.raises(InputError, match="read-timeout-s"):
        resolve({"model": "m.pt", "read_timeout_s": 0}, environ={})
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--read-timeout-s" in help_text and "YOLO_BATCH_READ_TIMEOUT_S" in help_text
    assert "--max-connections" in help_text


# --- a hot folder the service cannot use: one line, exit 2, before the model is loaded ---------------------------


@pytest.mark.parametrize("spoil, expected", [
    ("out/results.jsonl", "results.jsonl is a folder"),
    ("in/done", "done is not a folder"),
])
def test_an_unusable_hot_folder_is_one_line_and_exit_2_before_the_model_loads(tmp_path, spoil, expected):
    for folder in ("in", "out"):
        (tmp_path / folder).mkdir()
    if spoil.endswith(".jsonl"):
        (tmp_path / spoil).mkdir()
    else:
        (tmp_path / spoil).write_text("a file where a folder goes")
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "absent.pt"), "--port", "0",
                                       "--watch", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "absent.pt" not in result.output  # checked before the model
    assert len(result.output.strip().splitlines()) == 1


def _served_as_another_user(watch: Path, out: Path, locked: Path) -> tuple[str | None, bool]:
    """serve() as a user who cannot write ``locked``: (its InputError line, whether the model loaded)."""
    def refused() -> list:
        loaded: list = []
        try:
            serve(fake_config(watch=watch, out=out), lambda c: loaded.append(c) or FakeBackend(c))
        except InputError as exc:
            return [str(exc), bool(loaded)]
        raise AssertionError("serve() did not refuse the folder with an InputError")

    message, loaded = as_nobody(refused)
    return message, loaded


@pytest.mark.parametrize("locked", ["in", "out"])
def test_a_read_only_watch_or_out_is_refused_before_the_model_loads(locked):
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        for folder in ("in", "out"):
            (base / folder).mkdir()
            if os.geteuid() == 0:
                os.chown(base / folder, 0 if folder == locked else 65534, 0 if folder == locked else 65534)
        (base / locked).chmod(0o555)
        message, loaded = _served_as_another_user(base / "in", base / "out", base / locked)
        assert f"{base / locked} is not writable" in message and "\n" not in message
        assert not loaded
    finally:
        for path in (base / "in", base / "out"):
            path.chmod(0o755)
        for path in sorted(base.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        base.rmdir()
