"""The service with a real model over real HTTP on 127.0.0.1: same detections as ``yolo-batch infer``, concurrent
requests really batched, bad input answered 400/413/415 without disturbing the others, out-of-memory split."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from inference_fixtures import _png_header, bccd_images, detector, image_folder  # noqa: F401 (fixtures)
from serving_fixtures import LiveServer
from test_inference_parity import CONF, IMGSZ, assert_parity, rows_from_ours

from yolo_batch.inference import BatchSetting, InferConfig, run_inference
from yolo_batch.serving.backend import DetectorBackend
from yolo_batch.serving.config import ServeConfig

MIB = 1 << 20


def serve_config(model: Path, **overrides) -> ServeConfig:
    settings = {"model": str(model), "imgsz": IMGSZ, "conf": CONF, "device": "cpu", "backend": "torch",
                "precision": "fp32", "max_batch": 4,
                "max_delay_ms": 20.0, "port": 0, "timeout_ms": 60_000.0, "max_image_bytes": MIB,
                "max_body_bytes": 4 * MIB, "max_images": 4, "max_pixels": 2_000_000}
    return ServeConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def served(detector):
    with LiveServer(serve_config(detector)) as server:
        yield server.wait_ready()


def infer_rows(folder: Path, model: Path, out: Path) -> dict[str, np.ndarray]:
    config = InferConfig(sources=(str(folder),), model=str(model), out=out, imgsz=IMGSZ, conf=CONF,
                         batch=BatchSetting(4), device="cpu", backend="torch", precision="fp32")
    assert run_inference(config).failed == 0
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {Path(x["path"]).name: rows_from_ours(x) for x in lines}


def post(server: LiveServer, path: Path) -> dict:
    with server.client() as client:
        response = client.post(f"/v1/detect?name={path.name}", content=path.read_bytes(),
                               headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def test_detections_equal_infer_single_and_multipart(served, detector, image_folder, tmp_path):
    reference = infer_rows(image_folder, detector, tmp_path / "infer")
    images = sorted(image_folder.iterdir())
    with ThreadPoolExecutor(8) as pool:  # concurrent: the answers come from shared batches
        single = {r["path"]: rows_from_ours(r) for r in pool.map(lambda p: post(served, p), images)}
    assert assert_parity(reference, single) > 50
    with served.client() as client:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images[:4]]
        response = client.post("/v1/detect", files=files)
    assert response.status_code == 200, response.text
    records = response.json()["results"]
    assert [r["path"] for r in records] == [p.name for p in images[:4]]  # the request's order
    assert_parity({p.name: reference[p.name] for p in images[:4]}, {r["path"]: rows_from_ours(r) for r in records})
    first = records[0]
    assert set(first) == {"path", "width", "height", "detections", "timing_ms"}  # results.jsonl's schema
    assert {"decode", "letterbox", "inference", "batch", "wait"} <= set(first["timing_ms"])


def test_concurrent_requests_share_batches(detector):
    """A max delay far longer than the test: the batch can only be dispatched by filling up."""
    images = bccd_images(8)
    with LiveServer(serve_config(detector, max_batch=8, max_delay_ms=600_000.0)) as server:
        server.wait_ready()
        before = server.metrics()
        barrier = threading.Barrier(len(images))

        def send(path: Path) -> dict:
            barrier.wait(30)
            return post(server, path)

        with ThreadPoolExecutor(len(images)) as pool:
            results = list(pool.map(send, images, timeout=120))
        after = server.metrics()
    count = after["yolo_batch_batch_size_count"] - before.get("yolo_batch_batch_size_count", 0)
    total = after["yolo_batch_batch_size_sum"] - before.get("yolo_batch_batch_size_sum", 0)
    assert total == 8 and count <= 2  # one batch of 8, or (CPU: one stream per core) one share of it per stream
    assert total / count >= 4 and all(r["timing_ms"]["batch"] == 8 / count for r in results)


def jpeg(width: int = 96, height: int = 64) -> bytes:
    return cv2.imencode(".jpg", np.full((height, width, 3), 200, np.uint8))[1].tobytes()


BAD = [
    # name, body, content type, status, error kind
    ("not an image", b"hello world", "image/jpeg", 400, "not-an-image"),
    ("truncated jpeg", jpeg()[:300], "image/jpeg", 400, "corrupt"),
    ("empty body", b"", "image/jpeg", 400, "empty"),
    ("over the image byte limit", b"\xff\xd8\xff" + b"\0" * (MIB + 10), "application/octet-stream", 413,
     "too-large"),
    ("over the pixel limit", _png_header(200_000, 200_000), "image/png", 413, "too-large"),
    ("over the body limit", b"\xff\xd8" * (2 * MIB + 10), "image/jpeg", 413, "body-too-large"),
    ("json", b'{"image": 1}', "application/json", 415, "unsupported-media-type"),
    ("multipart without boundary", b"--x\r\n", "multipart/form-data", 400, "malformed-body"),
    ("multipart without files", b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b--\r\n',
     "multipart/form-data; boundary=b", 400, "no-image"),
]


@pytest.mark.parametrize("name, body, content_type, status, kind", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_error(served, name, body, content_type, status, kind):
    with served.client() as client:
        response = client.post("/v1/detect", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind and response.json()["detail"]


def test_too_many_images_in_one_request_is_413(served):
    files = [("images", (f"{i}.jpg", jpeg(), "image/jpeg")) for i in range(5)]  # the limit is 4
    with served.client() as client:
        response = client.post("/v1/detect", files=files)
    assert response.status_code == 413 and response.json()["error"] == "too-many-images"


def test_one_bad_image_fails_its_request_and_names_it(served):
    files = [("images", ("good.jpg", jpeg(), "image/jpeg")), ("images", ("bad.jpg", b"nope", "image/jpeg"))]
    with served.client() as client:
        response = client.post("/v1/detect", files=files)
    assert response.status_code == 400
    assert response.json()["detail"] == {"image": 1, "name": "bad.jpg",
                                         "reason": "not an image: unrecognised file signature"}


def test_bad_requests_beside_good_ones_leave_the_good_answers_intact(served, detector):
    images = bccd_images(6)
    expected = {p.name: rows_from_ours(post(served, p)) for p in images}
    bodies = [(p.name, p.read_bytes()) for p in images] + [(f"bad{i}", jpeg()[:200]) for i in range(6)]

    def send(item: tuple[str, bytes]) -> tuple[str, int, dict]:
        with served.client() as client:
            response = client.post(f"/v1/detect?name={item[0]}", content=item[1])
        return item[0], response.status_code, response.json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, bodies))
    good = {name: rows_from_ours(body["results"][0]) for name, status, body in answers if status == 200}
    assert sorted(good) == sorted(expected)
    assert_parity(expected, good)
    assert sorted(status for name, status, _ in answers if name.startswith("bad")) == [400] * 6


def test_out_of_device_memory_splits_the_batch_and_every_caller_is_answered(detector):
    tried: list[int] = []

    def load(config: ServeConfig) -> DetectorBackend:
        backend = DetectorBackend.load(config)
        real_run = backend.engine.run

        def run(host, plans):  # a device that holds one image at a time
            tried.append(len(plans))
            if len(plans) > 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_run(host, plans)

        backend.engine.run = run
        return backend

    images = bccd_images(4)
    with LiveServer(serve_config(detector, max_batch=4, max_delay_ms=600_000.0, streams=1), load) as server:
        server.wait_ready()
        tried.clear()  # warm-up ran one image
        barrier = threading.Barrier(4)

        def send(path: Path) -> dict:
            barrier.wait(30)
            return post(server, path)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send, images, timeout=120))
        assert [Path(a["path"]).name for a in answers] == [p.name for p in images]
        assert tried == [4, 2, 1, 1, 1, 1]  # halved, then one at a time
        metrics = server.metrics()
        with server.client() as client:
            info = client.get("/v1/info").json()
    assert metrics["yolo_batch_oom_splits_total"] == 2
    assert info["max_batch"] == 1 and [e["batch"] for e in info["oom_events"]] == [4, 2]


def test_an_image_too_big_for_the_device_alone_is_503(detector):
    def load(config: ServeConfig) -> DetectorBackend:
        backend = DetectorBackend.load(config)
        backend.warm_up()  # with the real engine; then every forward pass runs out of memory

        def run(host, plans):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

        backend.engine.run = run
        backend.warm_up = lambda: None
        return backend

    with LiveServer(serve_config(detector), load) as server:
        server.wait_ready()
        with server.client() as client:
            response = client.post("/v1/detect", content=jpeg())
    assert response.status_code == 503 and response.json()["error"] == "device-memory"


def test_info_metrics_and_openapi(served):
    with served.client() as client:
        info = client.get("/v1/info").json()
        metrics = client.get("/metrics")
        schema = client.get("/openapi.json").json()
    assert info["ready"] and info["device"] == "cpu" and info["max_batch"] == 4 and info["imgsz"] == IMGSZ
    assert info["settings"]["max_delay_ms"] == 20.0 and info["version"] and "torch" in info["versions"]
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("yolo_batch_http_requests_total", "yolo_batch_images_total", "yolo_batch_batch_size_bucket",
                 "yolo_batch_queue_depth", "yolo_batch_request_latency_seconds_bucket", "yolo_batch_errors_total",
                 "yolo_batch_ready 1.0"):
        assert name in metrics.text
    assert {"/v1/detect", "/healthz", "/readyz", "/metrics", "/v1/info"} <= set(schema["paths"])
    body = schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "application/octet-stream", "multipart/form-data"} <= set(body)


def test_max_batch_auto_measures_with_the_infer_autobatch(detector):
    with LiveServer(serve_config(detector, imgsz=64, max_batch="auto", max_latency_ms=1000.0)) as server:
        server.wait_ready()
        with server.client() as client:
            info = client.get("/v1/info").json()
            answer = client.post("/v1/detect", content=jpeg())
    choice = info["batch_choice"]
    assert info["max_batch_setting"] == "auto" and choice["max_latency_ms"] == 1000.0
    assert info["max_batch"] == choice["batch"] and [s["batch"] for s in choice["samples"]][:2] == [1, 2]
    assert answer.status_code == 200
