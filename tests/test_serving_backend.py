"""The service's model side without HTTP: a mixed batch is grouped by shape and answered in order, and batches run
side by side on different shapes decode their own boxes (Ultralytics' Detect head caches anchors per shape in
module attributes, so streams must not share one module)."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import torch
from inference_fixtures import detector  # noqa: F401 (fixture)
from test_inference_parity import CONF, IMGSZ, unmatched

from yolo_batch.inference import Engine, NmsSettings
from yolo_batch.serving.backend import DetectorBackend, ItemResult
from yolo_batch.serving.config import ServeConfig


def rows(detections) -> np.ndarray:
    return np.array([[*d.box, d.confidence, d.class_id] for d in detections], dtype=np.float64).reshape(-1, 6)


def encoded(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()  # lossless: the decoded pixels are the array's


def test_a_mixed_batch_is_grouped_by_shape_and_answered_in_order(detector):
    backend = DetectorBackend.load(ServeConfig(model=str(detector), imgsz=IMGSZ, conf=CONF, device="cpu",
                                                  backend="torch", precision="fp32"))
    try:
        backend.warm_up()
        rng = np.random.default_rng(1)
        images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in
                  [(120, 160, 3), (160, 120, 3), (120, 160, 3), (90, 160, 3), (160, 120, 3)]]
        prepared = [backend.prepare(encoded(im), f"{i}.png") for i, im in enumerate(images)]
        results = backend.process(prepared)
        assert all(isinstance(r, ItemResult) for r in results)
        assert [r.batch for r in results] == [2, 2, 2, 1, 2]  # images of one letterboxed shape ran together
        for image, result in zip(images, results):
            alone = backend.engine.predict([image])[0]
            assert unmatched(rows(alone), rows(result.detections)) == ([], [])
    finally:
        backend.close()


def test_streams_on_different_shapes_decode_their_own_boxes(detector):
    torch.set_num_threads(1)
    engine = Engine.load(str(detector), torch.device("cpu"), False, IMGSZ, NmsSettings(conf=CONF))
    rng = np.random.default_rng(0)
    images = {"wide": rng.integers(0, 255, (120, 160, 3), dtype=np.uint8),  # 128x160 input
              "tall": rng.integers(0, 255, (160, 120, 3), dtype=np.uint8)}  # 160x128: as many anchors, other places
    expected = {name: rows(engine.predict([im])[0]) for name, im in images.items()}
    wrong: list[str] = []
    modules: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def stream(name: str) -> None:
        barrier.wait(30)
        modules[name] = engine.runtime.thread_module()
        for _ in range(120):
            got = rows(engine.predict([images[name]])[0])
            if got.shape != expected[name].shape or not np.allclose(got, expected[name], atol=1e-3):
                wrong.append(name)

    threads = [threading.Thread(target=stream, args=(name,)) for name in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not wrong, f"{len(wrong)} of 240 forward passes decoded another stream's boxes"
    assert modules["wide"] is not modules["tall"]
    assert engine.runtime.thread_module() is engine.runtime.thread_module()  # one module per thread, kept


def test_max_batch_auto_plots_beside_the_hot_folder_results_or_says_why_not(tmp_path, caplog):
    caplog.set_level("INFO", logger="yolo_batch.serving.backend")
    watched = ServeConfig(model="yolo11n.yaml", imgsz=64, device="cpu", max_batch="auto", max_latency_ms=2000.0,
                          watch=tmp_path / "in", out=tmp_path / "out")
    for config, plot in ((watched, tmp_path / "out" / "throughput.png"),
                         (ServeConfig(model="yolo11n.yaml", imgsz=64, device="cpu", max_batch="auto"), None)):
        backend = DetectorBackend.load(config)
        try:
            backend.warm_up()
        finally:
            backend.close()
        info = backend.info()
        assert info["batch_choice"]["batch"] == backend.batch_size()
        if plot is None:
            assert info["throughput_plot"] is None
            assert "no --out, so no throughput.png" in caplog.text
        else:
            assert info["throughput_plot"] == str(plot) and plot.read_bytes().startswith(b"\x89PNG")
