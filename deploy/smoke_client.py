"""The HTTP and hot-folder side of deploy/smoke.sh: checks a running yolo-batch service from the host.

Standard library only (the host's python3, which Debian's docker-compose brings), so that it runs on a fresh
machine before any project venv exists. Each command prints one line per check and exits 1 on the first failure
(with what was expected and what came), 2 on bad usage.

    smoke_client.py wait URL [--timeout S]
    smoke_client.py check URL IMAGE --port P
    smoke_client.py hotfolder IN_DIR OUT_DIR IMAGE [--timeout S]
    smoke_client.py drain URL IMAGE --container C [--threads N] [--images-per-request K] -- STOP_COMMAND...

The bearer token comes from the environment (SMOKE_TOKEN), not the command line: it is a secret, and a token
may begin with '-'.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any


class CheckFailed(Exception):
    """A check did not hold; the message says what was expected and what came."""


def _ok(message: str) -> None:
    print(f"  ok  {message}", flush=True)


def _request(url: str, token: str | None = None, body: bytes | None = None, content_type: str | None = None,
             timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request on a fresh connection; HTTP errors are answers, not exceptions."""
    headers = {"Connection": "close"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise CheckFailed(f"{what}: not JSON: {body[:200]!r}") from None


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame marker."""
    if data[:2] != b"\xff\xd8":
        raise CheckFailed("not a JPEG file")
    at = 2
    while at + 9 < len(data):
        if data[at] != 0xFF:
            raise CheckFailed(f"JPEG marker expected at byte {at}")
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2:at + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    raise CheckFailed("no JPEG start-of-frame marker")


def wait_for(url: str, timeout: float) -> float:
    """Seconds until ``url`` answered 200."""
    started = time.monotonic()
    while True:
        try:
            if _request(url, timeout=5)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass  # not listening yet
        if time.monotonic() - started > timeout:
            raise CheckFailed(f"{url} did not answer 200 within {timeout:g} s")
        time.sleep(0.2)


def check_record(record: dict[str, Any], name: str, size: tuple[int, int], conf: float = 0.25) -> int:
    """Check one infer record for the image ``name`` of ``size``; returns its number of detections."""
    if record.get("path") != name or (record.get("width"), record.get("height")) != size:
        raise CheckFailed(f"record for {name} {size}: got path {record.get('path')!r}, "
                          f"size {(record.get('width'), record.get('height'))}")
    detections = record.get("detections")
    if not isinstance(detections, list) or not detections:
        raise CheckFailed(f"no detections for {name} (the smoke model finds boxes on it): {record}")
    width, height = size
    for detection in detections:
        x1, y1, x2, y2 = detection["box"]
        if not (isinstance(detection["class_id"], int) and isinstance(detection["name"], str)
                and conf <= detection["confidence"] <= 1.0 and 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
            raise CheckFailed(f"malformed detection for {name}: {detection}")
    return len(detections)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample (labels in any order), or None when absent."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


def check(url: str, token: str, image: Path, port: int) -> None:
    status = _request(f"{url}/healthz")[0]
    if status != 200:
        raise CheckFailed(f"/healthz without a token: expected 200, got {status}")
    _ok("/healthz answers without a token")
    for header, what in ((None, "no token"), ("wrong-" + token, "a wrong token")):
        status, _, body = _request(f"{url}/readyz", token=header)
        if status != 401 or _json(body, "/readyz").get("error") != "unauthorized":
            raise CheckFailed(f"/readyz with {what}: expected 401 unauthorized, got {status} {body[:200]!r}")
    _ok("/readyz without a token or with a wrong one: 401 unauthorized")
    deadline = time.monotonic() + 180
    while (status := _request(f"{url}/readyz", token=token)[0]) != 200:
        if time.monotonic() > deadline:
            raise CheckFailed(f"/readyz with the token: not 200 within 180 s (last {status})")
        time.sleep(0.3)
    _ok("/readyz with the token: 200 (model loaded and warmed up)")

    data = image.read_bytes()
    status, _, body = _request(f"{url}/v1/detect?name={image.name}", token=token, body=data,
                               content_type="image/jpeg")
    if status != 200:
        raise CheckFailed(f"/v1/detect: expected 200, got {status} {body[:300]!r}")
    results = _json(body, "/v1/detect")["results"]
    if len(results) != 1:
        raise CheckFailed(f"/v1/detect of one image: {len(results)} records")
    found = check_record(results[0], image.name, jpeg_size(data))
    _ok(f"/v1/detect {image.name}: {found} detection(s), boxes inside the image")

    status, _, body = _request(f"{url}/v1/info", token=token)
    info = _json(body, "/v1/info")
    if status != 200 or info["settings"]["port"] != port or info["device"] != "cpu":
        raise CheckFailed(f"/v1/info: expected port {port} on cpu, got {status} {info}")
    _ok(f"/v1/info: the service listens on port {port} inside the container, device cpu")

    if (status := _request(f"{url}/metrics")[0]) != 401:
        raise CheckFailed(f"/metrics without a token: expected 401, got {status}")
    status, _, body = _request(f"{url}/metrics", token=token)
    text = body.decode()
    answered = metric(text, "yolo_batch_images_total", source="http", outcome="ok")
    if status != 200 or not answered or answered < 1 or metric(text, "yolo_batch_ready") != 1.0:
        raise CheckFailed(f"/metrics: expected images_total{{http,ok}} >= 1 and ready 1, got {status} {text[:300]!r}")
    _ok(f"/metrics (token needed): {answered:g} image(s) answered over HTTP, ready 1")


def hotfolder(in_dir: Path, out_dir: Path, image: Path, timeout: float) -> None:
    # As deploy/README.md tells cameras to: write under a temporary name, rename when complete.
    partial = in_dir / f"{image.name}.part"
    shutil.copyfile(image, partial)
    partial.rename(in_dir / image.name)
    done = in_dir / "done" / image.name
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise CheckFailed(f"{image.name} not moved to {done.parent} within {timeout:g} s")
        time.sleep(0.2)
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    mine = [r for r in records if r.get("file") == image.name]
    if len(mine) != 1:
        raise CheckFailed(f"results.jsonl: expected one line for {image.name}, got {len(mine)}")
    size = jpeg_size(image.read_bytes())
    found = check_record(mine[0], mine[0]["path"], size)
    if (in_dir / image.name).exists():
        raise CheckFailed(f"{image.name} is still in the hot folder after its line was written")
    _ok(f"hot folder: {image.name} -> results.jsonl ({found} detection(s)) and done/")


def _multipart(images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in images:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
                     "Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def signal_time(container: str) -> float:
    """When the service in ``container`` logged that it got SIGTERM (epoch seconds, from Docker's timestamps)."""
    logs = subprocess.run([os.environ.get("DOCKER", "docker"), "logs", "--timestamps", container],
                          capture_output=True, text=True, check=True)
    for line in (logs.stdout + logs.stderr).splitlines():
        if "shutting down: no new work" in line:
            stamp = line.split(" ", 1)[0].rstrip("Z")  # 2026-12-02T06:16:41.123456789Z
            whole, _, fraction = stamp.partition(".")
            moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc)
            return moment.timestamp() + float(f"0.{fraction or 0}")
    raise CheckFailed(f"{container} never logged 'shutting down: no new work'")


def _answer_kind(url: str, token: str, body: bytes, content_type: str, names: list[str],
                 size: tuple[int, int]) -> str:
    """One request under load: "200" (every record checked), "503 shutting-down", "not accepted (...)", or
    what else came."""
    try:
        status, _, answer = _request(f"{url}/v1/detect", token=token, body=body, content_type=content_type,
                                     timeout=120)
    except (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError) as error:
        return f"not accepted ({type(getattr(error, 'reason', error)).__name__})"
    if status == 503 and _json(answer, "/v1/detect").get("error") in ("shutting-down", "not-ready"):
        return "503 shutting-down"
    if status != 200:
        return f"unexpected {status} {answer[:200]!r}"
    results = _json(answer, "/v1/detect")["results"]
    if len(results) != len(names):
        return f"incomplete: {len(results)} of {len(names)} records"
    try:
        for record, name in zip(results, names):
            check_record(record, name, size)
    except CheckFailed as failure:
        return f"bad record: {failure}"
    return "200"


def drain(url: str, token: str, image: Path, threads: int, per_request: int, container: str,
          stop: list[str]) -> None:
    """Keep the service busy from ``threads`` clients, run ``stop`` (docker stop, compose stop) while requests
    are queued, and check that every request the service accepted was answered in full, some of them after the
    service logged the signal (so they were queued when it came)."""
    data = image.read_bytes()
    size = jpeg_size(data)
    names = [f"{i}-{image.name}" for i in range(per_request)]
    body, content_type = _multipart([(name, data) for name in names])
    outcomes: list[tuple[str, float]] = []  # (kind, wall-clock time the answer came)
    lock = threading.Lock()
    stopping = threading.Event()

    def client() -> None:
        while True:
            try:
                kind = _answer_kind(url, token, body, content_type, names, size)
            except CheckFailed as failure:  # an answer that is not JSON: reported below, with the others
                kind = f"bad answer: {failure}"
            with lock:
                outcomes.append((kind, time.time()))
            if stopping.is_set() and kind != "200":
                return

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 120
    while True:  # load for a moment: every client has had an answer, so the queue is full of the next ones
        with lock:
            if len(outcomes) >= 2 * threads:
                break
        if time.monotonic() > deadline:
            raise CheckFailed(f"{2 * threads} answers under load did not come within 120 s")
        time.sleep(0.05)
    stop_at = time.time()
    stopping.set()
    subprocess.run(stop, check=True, stdout=subprocess.DEVNULL)
    stopped_at = time.time()
    for worker in workers:
        worker.join(timeout=60)
    if any(worker.is_alive() for worker in workers):
        raise CheckFailed("a client still waits for an answer 60 s after the service stopped")
    late, refused = judge_drain(outcomes, signal_time(container))
    _ok(f"stop under load ({threads} clients x {per_request} images): {len(late)} request(s) queued at SIGTERM "
        f"answered in full (the last {max(late):.2f} s after it), {refused} refused; the stop command took "
        f"{stopped_at - stop_at:.1f} s")


def judge_drain(outcomes: list[tuple[str, float]], signalled: float) -> tuple[list[float], int]:
    """(seconds after SIGTERM of each 200 that came after it, requests refused); fails on anything else, or when
    no answer came after the signal (then nothing was queued, and the drain went untested)."""
    bad = [kind for kind, _ in outcomes if kind != "200" and not kind.startswith(("not accepted", "503"))]
    if bad:
        raise CheckFailed(f"answers other than 200, 503 shutting-down or a refused connection: {bad[:5]}")
    late = [at - signalled for kind, at in outcomes if kind == "200" and at > signalled]
    if not late:
        raise CheckFailed("no request was answered after the service got SIGTERM: nothing was queued to drain")
    return late, sum(1 for kind, _ in outcomes if kind != "200")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="smoke_client.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("wait")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=180.0)
    p = commands.add_parser("check")
    p.add_argument("url")
    p.add_argument("image", type=Path)
    p.add_argument("--port", type=int, required=True, help="the port the service listens on (inside the container)")
    p = commands.add_parser("hotfolder")
    p.add_argument("in_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("--timeout", type=float, default=60.0)
    p = commands.add_parser("drain")
    p.add_argument("url")
    p.add_argument("image", type=Path)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--images-per-request", type=int, default=2)
    p.add_argument("--container", required=True, help="its container, whose log says when SIGTERM came")
    p.add_argument("stop", nargs="+", help="the command that stops the service (after --)")
    args = parser.parse_args(argv)
    token = os.environ.get("SMOKE_TOKEN", "")
    if args.command in ("check", "drain") and not token:
        parser.error("set SMOKE_TOKEN to the service's bearer token")
    try:
        if args.command == "wait":
            print(f"{wait_for(args.url, args.timeout):.1f}")
        elif args.command == "check":
            check(args.url, token, args.image, args.port)
        elif args.command == "hotfolder":
            hotfolder(args.in_dir, args.out_dir, args.image, args.timeout)
        else:
            drain(args.url, token, args.image, args.threads, args.images_per_request, args.container, args.stop)
    except CheckFailed as failure:
        print(f"FAIL {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
