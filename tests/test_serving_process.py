"""``yolo-batch serve`` as a real process: SIGTERM drains and exits 0; the hot folder survives ``kill -9`` with every
file processed exactly once; bad usage is one line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import bccd_images, detector  # noqa: F401 (fixtures)
from serving_fixtures import free_port, parse_metrics, until, wait_for_status
from unprivileged import refusal_as_nobody

from yolo_batch.cli import main
from yolo_batch.serving.server import check_hot_folder_access


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_BATCH_TOKEN")}
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "yolo_batch.cli", "serve", *args], stdout=handle,
                                stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"})


def ready(url: str, process: subprocess.Popen, log: Path) -> None:
    wait_for_status(f"{url}/readyz", process, log)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_finishes_queued_work_and_exits_0(detector, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # One slow stream (imgsz 640, batch 1) so that work is still queued when the signal arrives.
    process = start(["--model", str(detector), "--port", str(port), "--imgsz", "640", "--max-batch", "1",
                     "--streams", "1", "--threads", "1", "--device", "cpu", "--timeout-ms", "60000",
                     "--grace-s", "60", "--backend", "torch", "--precision", "fp32"], log)
    try:
        ready(url, process, log)
        images = [p.read_bytes() for p in bccd_images(8)] * 2
        barrier = threading.Barrier(len(images))

        def send(body: bytes) -> int | str:
            barrier.wait(30)
            try:
                return httpx.post(f"{url}/v1/detect", content=body, timeout=120).status_code
            except httpx.TransportError as exc:  # arrived after the listener closed
                return type(exc).__name__

        with ThreadPoolExecutor(len(images)) as pool:
            answers = [pool.submit(send, body) for body in images]
            in_flight = until(lambda: parse_metrics(httpx.get(f"{url}/metrics", timeout=5).text)
                              .get("yolo_batch_images_in_flight", 0) >= 8, what="8 images in flight")
            assert in_flight
            process.send_signal(signal.SIGTERM)
            codes = [a.result(120) for a in answers]
        assert process.wait(120) == 0, log.read_text()
    finally:
        stop(process)
    assert codes.count(200) >= 8, codes  # everything accepted before the signal was answered
    assert set(codes) <= {200, 503, "ConnectError"}, codes
    text = log.read_text()
    assert "shutting down" in text and "Traceback" not in text


def test_hot_folder_loses_nothing_and_repeats_nothing_across_kill_9(detector, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    base = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    total = 400
    for i in range(total):
        cv2.imwrite(str(inbox / f"{i:03d}.jpg"), np.roll(base, i, axis=1))
    (inbox / "broken.jpg").write_bytes(b"not an image")
    log = tmp_path / "serve.log"
    args = ["--model", str(detector), "--imgsz", "320", "--max-batch", "2", "--device", "cpu", "--conf", "0.5",
            "--watch", str(inbox), "--out", str(out), "--poll-ms", "50", "--log-level", "info",
            "--backend", "torch", "--precision", "fp32"]
    results = out / "results.jsonl"

    def journaled() -> int:
        return results.read_text().count("\n") if results.exists() else 0

    first = start([*args, "--port", str(free_port())], log)
    try:
        until(lambda: journaled() >= 20 or first.poll() is not None, timeout=120, what="20 results")
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(30)
    assert first.returncode == -signal.SIGKILL, log.read_text()
    before = journaled()
    assert 20 <= before < total, "the first run should have been killed mid-way"

    port = free_port()
    second = start([*args, "--port", str(port)], log)
    try:
        until(lambda: (len(list((inbox / "done").iterdir())) == total and not (inbox / "broken.jpg").exists())
              or second.poll() is not None, timeout=120, what="every file moved")
        assert stop(second) == 0, log.read_text()
    finally:
        stop(second)
    names = [json.loads(line)["file"] for line in results.read_text().splitlines()]
    assert Counter(names) == Counter(f"{i:03d}.jpg" for i in range(total))  # each exactly once
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["file"], e["kind"]) for e in errors] == [("broken.jpg", "not-an-image")]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == [f"{i:03d}.jpg" for i in range(total)]
    assert [p.name for p in (inbox / "failed").iterdir()] == ["broken.jpg"]
    assert sorted(p.name for p in inbox.iterdir()) == ["done", "failed"]


@pytest.mark.parametrize("args, message", [
    (["--model", "missing.pt", "--port", "0"], "missing.pt"),
    (["--port", "0"], "no model"),
    (["--model", "yolo11n.yaml", "--port", "0", "--max-batch", "zero"], "batch must be 'auto' or an integer"),
    (["--model", "yolo11n.yaml", "--port", "0", "--watch", "in"], "--watch and --out go together"),
    (["--model", "yolo11n.yaml", "--port", "0", "--device", "7"], "unknown device '7'"),
])
def test_bad_usage_is_one_line_and_exit_code_2(args, message, monkeypatch):
    monkeypatch.delenv("YOLO_BATCH_MODEL", raising=False)
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_exit_code_2():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--model", "yolo11n.yaml", "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "missing.pt"], "model file not found: missing.pt"),
    (["--model", "yolo11n.yaml", "--device", "7"], "unknown device '7'"),
    (["--model", "yolo11n.yaml", "--max-batch", "0"], "batch must be 'auto' or an integer >= 1"),
    (["--model", "yolo11n.yaml", "--concurrency", "0"], "concurrency must be >= 1"),
])
def test_bench_serve_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(bccd_images(1)[0].read_bytes())
    result = CliRunner().invoke(main, ["bench", "serve", str(folder), *args, "--json"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


@pytest.mark.parametrize("max_batch", ["4", "auto"])
def test_bench_serve_reports_throughput_latency_batches_and_the_offline_ratio(detector, tmp_path, max_batch):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in bccd_images(4):
        (folder / path.name).write_bytes(path.read_bytes())
    result = CliRunner().invoke(main, ["bench", "serve", str(folder), "--model", str(detector), "--imgsz", "64",
                                       "--device", "cpu", "--max-batch", max_batch, "--requests", "24",
                                       "--concurrency", "4", "--warmup", "4", "--offline-rounds", "1", "--backend",
                                       "torch", "--precision", "fp32", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["answered"] == 24 and report["failed"] == {} and report["images"] == 4
    assert report["images_per_s"] > 0 and report["offline_images_per_s"] > 0
    assert report["ratio_to_offline"] == pytest.approx(report["images_per_s"] / report["offline_images_per_s"],
                                                       rel=0.01)
    assert report["max_batch_setting"] == max_batch and report["streams"] >= 1
    if max_batch != "auto":
        assert report["max_batch"] == 4
    assert 1 <= report["mean_batch"] <= report["max_batch"]
    assert report["batch_ms"]["per_batch"] > 0 and report["batch_ms"]["per_request"] > 0
    assert report["batch_cycles"] == pytest.approx(4 / (report["streams"] * report["max_batch"]), abs=0.01)
    latency, parts = report["latency_ms"], report["latency_parts_ms"]
    assert latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    # The service's own timings fit inside what the client measured.
    assert 0 < parts["batch"]["p50"] <= latency["p50"] and parts["outside"]["p99"] <= latency["max"]
    assert report["target"]["p99_bound_ms"] == pytest.approx(
        report["max_delay_ms"] + 2 * report["batch_ms"]["per_request"], abs=0.02)
    assert report["target"]["p99_met"] == (latency["p99"] <= report["target"]["p99_bound_ms"])


def _checked_as_another_user(watch: Path, out: Path) -> str | None:
    """check_hot_folder_access's one line (None: passed) as a user who is not root."""
    return refusal_as_nobody(lambda: check_hot_folder_access(watch, out)) or None


@pytest.mark.parametrize("locked, expected", [
    ((), None),
    (("in",), "/in is not writable by this process"),
    (("in/done",), "/in/done is not writable"),
    (("out",), "/out is not writable"),
    (("out/results.jsonl",), "/out/results.jsonl is not writable"),
    (("box",), None),  # in and out exist and are writable: the folder above them does not matter
])
def test_hot_folders_the_service_cannot_write_are_one_line_at_start(locked, expected):
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)  # the other user must reach what is inside
        box = base / "box"
        for folder in ("in/done", "in/failed", "out"):
            (box / folder).mkdir(parents=True)
        (box / "out" / "results.jsonl").write_text("")
        paths = [box, *sorted(box.rglob("*"))]
        for path in paths:  # writable for the checking process, except what the case locks
            is_locked = str(path.relative_to(base / "box")) in locked if path != box else "box" in locked
            if os.geteuid() == 0:
                os.chown(path, 0 if is_locked else 65534, 0 if is_locked else 65534)
            if is_locked:
                path.chmod(0o555 if path.is_dir() else 0o444)
        message = _checked_as_another_user(box / "in", box / "out")
        if expected is None:
            assert message is None
        else:
            assert message is not None and expected in message and "\n" not in message
            assert "chown -R" in message
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)


def test_a_missing_out_folder_is_checked_where_it_would_be_created():
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        (base / "in").mkdir()
        if os.geteuid() == 0:
            os.chown(base / "in", 65534, 65534)  # base itself stays root's: out cannot be created in it
        else:
            base.chmod(0o555)
        message = _checked_as_another_user(base / "in", base / "out" / "deeper")
        assert message is not None and message.startswith(f"{base} is not writable")
    finally:
        base.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("command", [["serve"], ["infer", "{images}"], ["serve", "--watch", "{images}/a.jpg",
                                                                        "--out", "{images}"]])
def test_a_bad_start_is_the_only_line_a_real_process_prints(command, tmp_path):
    """As the container runs it: logging configured, so nothing (the runtime choice's INFO line included) may be
    said before the refusal."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(bccd_images(1)[0].read_bytes())
    args = [a.format(images=images) for a in command]
    done = subprocess.run([sys.executable, "-m", "yolo_batch.cli", *args, "--model", str(tmp_path / "model.pt"),
                           "--out", str(tmp_path / "out")] if command[0] == "infer" else
                          [sys.executable, "-m", "yolo_batch.cli", *args, "--model", str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    missing = f"Error: model file not found: {tmp_path / 'model.pt'} (weights are never downloaded; pass a local .pt)"
    expected = f"Error: --watch {images / 'a.jpg'} is not a folder" if "--watch" in command else missing
    assert done.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()
