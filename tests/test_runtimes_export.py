"""Exported runtimes end to end on CPU: export through Ultralytics (offline, cached), infer, and the detections
compared with PyTorch fp32 on the same images and model.

Accuracy: fp32 runtimes give the same boxes as PyTorch fp32 (within 1 px, same class, score within 1e-3).
For bf16 the issue's contract (for >= 98 % of the detections above conf 0.25 on either side, one on the other
side of the same class with IoU >= 0.9; the other side run at a lower conf, so a score that moves across 0.25 is
not a miss) is measured on a trained BCCD model in docs/benchmarks.md (`yolo-batch bench accuracy`): it needs a trained
model, and none fits in the suite's time. Measured here: yolo11n from scratch on the shapes set, 30 epochs at
imgsz 96, and 120 steps fine-tuning on 8 images at imgsz 64, score 0 and 14 boxes above 0.25, and no weights
can be downloaded. The suite's model is the session's ``detector`` (inference_fixtures: yolo11n with BatchNorm
statistics calibrated on real images, hundreds of boxes above 0.25 at imgsz 96): its random features leave
the 80 class scores of a box close together, so bf16 rounding changes the class of about a fifth of them
(measured: 76 % of boxes matched for torch bf16, 84 % for OpenVINO bf16). The bf16 test here checks the same
criterion against that model's floor (70 %), which still fails if bf16 breaks boxes.
Exports are shared by the module (one cache folder), so each runtime exports once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import bccd_images, coco8_images, detector  # noqa: F401 (fixtures)

from yolo_batch.cli import main
from yolo_batch.inference import BatchSetting, InferConfig, run_inference
from yolo_batch.inference.accuracy import matched_share  # the contract's rule, as bench accuracy applies it

IMGSZ = 96
CONF = 0.25
LOW = 0.1  # the other side's conf when matching bf16 detections
PX = 1.0
SCORE = 1e-3
BF16_FLOOR = 0.7  # the untrained detector's level (module docstring); a trained model gives >= 0.98


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """coco8 (mixed shapes) and 8 BCCD images (640x480)."""
    folder = tmp_path_factory.mktemp("images")
    for path in coco8_images() + bccd_images(8):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """One yolo-batch cache for the module, so each runtime exports the detector once."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def cache(exports, monkeypatch) -> Path:
    monkeypatch.setenv("YOLO_BATCH_CACHE_DIR", str(exports))
    return exports / "exports"


def run(model: Path, images: Path, out: Path, backend: str, precision: str, conf: float = CONF, **more):
    config = InferConfig(sources=(str(images),), model=str(model), out=out, imgsz=IMGSZ, conf=conf,
                         batch=BatchSetting(4), device="cpu", backend=backend, precision=precision, **more)
    summary = run_inference(config)
    assert summary.failed == 0
    rows = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows[Path(record["path"]).name] = np.array(
            [[*d["box"], d["confidence"], d["class_id"]] for d in record["detections"]]).reshape(-1, 6)
    return summary, rows


def assert_same_boxes(reference: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> int:
    """fp32: one-to-one, same class, within 1 px and 1e-3 in score (a score within 1e-3 of conf may fall either
    side of it)."""
    assert set(reference) == set(ours)
    total = 0
    for name, theirs in reference.items():
        free = list(range(len(ours[name])))
        lost = []
        for row in theirs[np.argsort(-theirs[:, 4])]:
            hit = next((j for j in free if ours[name][j, 5] == row[5] and abs(ours[name][j, 4] - row[4]) <= SCORE
                        and np.abs(ours[name][j, :4] - row[:4]).max() <= PX), None)
            if hit is None:
                lost.append(row)
            else:
                free.remove(hit)
        odd = [r for r in lost + [ours[name][j] for j in free] if r[4] >= CONF + SCORE]
        assert not odd, (name, odd[:3])
        total += len(theirs)
    return total


@pytest.fixture(scope="module")
def reference(detector, images, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """PyTorch fp32 at CONF and at LOW."""
    out = tmp_path_factory.mktemp("reference")
    return {str(conf): run(detector, images, out / str(conf), "torch", "fp32", conf=conf)[1] for conf in (CONF, LOW)}


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_fp32_runtimes_give_torch_fp32_boxes(backend, detector, images, reference, cache, tmp_path):
    summary, ours = run(detector, images, tmp_path / "out", backend, "fp32")
    assert (summary.backend, summary.precision) == (backend, "fp32")
    assert summary.export["cached"] and Path(summary.export["location"]).parent == cache
    assert assert_same_boxes(reference[str(CONF)], ours) > 200


@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_bf16_matches_torch_fp32_by_iou(backend, detector, images, reference, cache, tmp_path):
    from yolo_batch.inference.runtimes.host import cpu_flags

    if not (cpu_flags() or frozenset()) & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no bf16 instructions")
    _, ours = run(detector, images, tmp_path / "low", backend, "bf16", conf=LOW)
    share, back = matched_share(ours, reference[str(LOW)]), matched_share(reference[str(LOW)], ours)
    above = sum(int((rows[:, 4] >= CONF).sum()) for rows in ours.values())
    assert above > 200 and sum(int((rows[:, 4] >= CONF).sum()) for rows in reference[str(LOW)].values()) > 200
    assert share >= BF16_FLOOR and back >= BF16_FLOOR, (share, back)  # see the module docstring


def convolution_precisions(compiled) -> dict[str, set[str]]:
    """Runtime precisions of a compiled OpenVINO model's convolutions: the head's class branch and DFL, its box
    branch, and the body."""
    seen: dict[str, set[str]] = {"class and dfl": set(), "box": set(), "body": set()}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            first = info["originalLayersNames"].astype(str).split(",")[0]  # the convolution; fused activations follow
            part = ("class and dfl" if first.startswith(("__module.model.23.cv3.", "__module.model.23.dfl"))
                    else "box" if first.startswith("__module.model.23.cv2.") else "body")
            seen[part].add(info["runtimePrecision"].astype(str))
    return seen


def test_openvino_bf16_runs_the_class_branch_and_dfl_at_fp32(detector, images, cache, tmp_path):
    """The body's and the box branch's convolutions run at bf16, the class branch's and the DFL's at fp32 (what
    brought OpenVINO bf16 from 98.5 / 98.4 % to 99.2 / 99.0 % agreement on the BCCD model, docs/benchmarks.md),
    and its class scores are closer to fp32 than with the whole network at bf16."""
    from yolo_batch.core.telemetry import import_openvino
    from yolo_batch.inference.runtimes.host import cpu_flags
    from yolo_batch.inference.runtimes.openvino import OpenVinoRuntime, compile_config

    if not (cpu_flags() or frozenset()) & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no bf16 instructions")
    run(detector, images, tmp_path / "export", "openvino", "fp32")
    xml = next(cache.rglob("*.xml"))
    ours = OpenVinoRuntime(xml, "bf16", embed_input=False)
    core = import_openvino().Core()
    whole, fp32 = (core.compile_model(core.read_model(str(xml)), "CPU", compile_config(precision, 1, 1))
                   for precision in ("bf16", "fp32"))
    assert convolution_precisions(ours.compiled) == {"class and dfl": {"f32"}, "box": {"bf16"}, "body": {"bf16"}}
    assert convolution_precisions(whole)["class and dfl"] == {"bf16"}
    batch = np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    reference = fp32({0: batch})[0]
    score_error = np.abs(ours(batch).numpy()[:, 4:] - reference[:, 4:]).max()
    assert score_error < np.abs(whole({0: batch})[0][:, 4:] - reference[:, 4:]).max()
    assert "class branch and DFL" in ours.head


def test_a_second_run_reuses_the_export_and_new_weights_export_again(detector, images, cache, tmp_path, monkeypatch):
    from yolo_batch import ultralytics_adapter

    exported = []
    real = ultralytics_adapter.export_model

    def spy(*args, **kwargs):
        exported.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ultralytics_adapter, "export_model", spy)
    first, _ = run(detector, images, tmp_path / "a", "openvino", "fp32")
    again, _ = run(detector, images, tmp_path / "b", "openvino", "fp32")
    assert again.export["hit"] and again.export["location"] == first.export["location"]
    assert len(exported) <= 1  # the module's earlier tests may have exported it already
    changed = tmp_path / "changed.pt"
    data = bytearray(detector.read_bytes())
    shutil.copy(detector, changed)
    import torch

    from yolo_batch.ultralytics_adapter import load_model

    yolo = load_model(str(changed))
    with torch.no_grad():
        yolo.model.model[-1].cv3[0][-1].bias.add_(0.5)
    yolo.save(str(changed))
    assert changed.read_bytes() != bytes(data)
    before = len(exported)
    other, _ = run(changed, images, tmp_path / "c", "openvino", "fp32")
    assert len(exported) == before + 1 and not other.export["hit"]
    assert other.export["location"] != first.export["location"]
    assert len(list(cache.iterdir())) >= 2


def test_export_never_touches_the_network(detector, cache, tmp_path, monkeypatch):
    import socket

    from yolo_batch import ultralytics_adapter

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    folder = tmp_path / "export"
    folder.mkdir()
    exported = ultralytics_adapter.export_model(str(detector), "onnxruntime", folder, 64, 1, False, "cpu")
    assert exported.path.suffix == ".onnx" and exported.path.parent == folder and exported.stride == 32
    assert exported.names[0] and not exported.end2end


def test_no_cache_exports_again(detector, images, cache, tmp_path):
    first, _ = run(detector, images, tmp_path / "a", "onnxruntime", "fp32")
    again, _ = run(detector, images, tmp_path / "b", "onnxruntime", "fp32", use_cache=False)
    assert not again.export["hit"] and again.export["location"] == first.export["location"]


def cli(*args: str):
    return CliRunner().invoke(main, ["infer", *args], catch_exceptions=False)


def test_auto_prints_what_it_chose_and_where_the_export_is(detector, images, cache, tmp_path):
    out = tmp_path / "out"
    result = cli(str(images), "--model", str(detector), "--imgsz", str(IMGSZ), "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "openvino" and summary["runtime"]["requested_backend"] == "auto"
    assert "auto: openvino" in summary["runtime"]["reason"]
    assert "runtime" in result.stdout and "openvino" in result.stdout
    assert str(cache) in result.stdout.replace("\n", "").replace("│", "").replace(" ", "") or \
        summary["export"]["location"].startswith(str(cache))


def test_auto_falls_back_to_torch_without_openvino(detector, images, tmp_path, monkeypatch):
    from yolo_batch.inference.runtimes import host

    real = host.installed_packages
    monkeypatch.setattr(host, "installed_packages", lambda: {k: v for k, v in real().items() if k != "openvino"})
    out = tmp_path / "out"
    result = cli(str(images), "--model", str(detector), "--imgsz", "64", "--device", "cpu", "--out", str(out),
                 "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "torch" and "not openvino: openvino is not installed" in summary["runtime"]["reason"]


@pytest.mark.parametrize(("args", "facts", "message"), [
    (["--backend", "tensorrt"], "tensorrt-installed", "--backend tensorrt: tensorrt needs an NVIDIA GPU"),
    (["--backend", "tensorrt"], "no-tensorrt", "pip install 'yolo-batch[tensorrt]'"),
    (["--backend", "openvino"], "no-openvino", "pip install 'yolo-batch[openvino]'"),
    (["--backend", "torch", "--precision", "bf16"], "no-bf16", "bf16 needs a CPU with AVX512-BF16 or AMX"),
    (["--backend", "torch", "--precision", "fp16"], None, "--precision fp16 with torch"),
])
def test_unavailable_backend_or_precision_is_one_line_and_exit_2(args, facts, message, detector, images, tmp_path,
                                                                  monkeypatch):
    from yolo_batch.inference.runtimes import host

    real = host.installed_packages
    if facts == "no-openvino":
        monkeypatch.setattr(host, "installed_packages", lambda: {k: v for k, v in real().items() if k != "openvino"})
    if facts in {"tensorrt-installed", "no-tensorrt"}:
        extra = {"tensorrt": "10.13", "onnx": "1.23"} if facts == "tensorrt-installed" else {}
        monkeypatch.setattr(host, "installed_packages",
                            lambda: {**{k: v for k, v in real().items() if k != "tensorrt"}, **extra})
    if facts == "no-bf16":
        monkeypatch.setattr(host, "cpu_flags", lambda *a: frozenset({"avx2"}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["infer", str(images), "--model", str(detector), "--device", "cpu",
                                       "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written


def test_resume_refuses_to_mix_backends_or_precisions(detector, images, cache, tmp_path):
    out = tmp_path / "out"
    base = [str(images), "--model", str(detector), "--imgsz", "64", "--device", "cpu", "--out", str(out), "--quiet"]
    assert cli(*base, "--backend", "torch", "--precision", "fp32").exit_code == 0
    lines = (out / "results.jsonl").read_text()
    for other, words in ((["--backend", "openvino", "--precision", "fp32"], "backend 'torch' -> 'openvino'"),
                         (["--backend", "torch", "--precision", "bf16"], "precision 'fp32' -> 'bf16'")):
        result = CliRunner().invoke(main, ["infer", *base, *other])
        assert result.exit_code == 2 and words in result.stderr and "--overwrite" in result.stderr
        assert (out / "results.jsonl").read_text() == lines  # nothing mixed in
    assert cli(*base, "--backend", "torch", "--precision", "fp32").exit_code == 0  # the same settings resume
    result = cli(*base, "--backend", "openvino", "--precision", "fp32", "--overwrite")
    assert result.exit_code == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["result_settings"]["backend"] == "openvino" and manifest["runtime"]["backend"] == "openvino"


def test_serve_on_openvino_answers_like_torch(detector, images, reference, cache):
    from serving_fixtures import LiveServer

    from yolo_batch.serving.config import ServeConfig

    config = ServeConfig(model=str(detector), imgsz=IMGSZ, conf=CONF, device="cpu", backend="openvino",
                         precision="fp32", max_batch=4, max_delay_ms=20.0, port=0, timeout_ms=60_000.0)
    paths = sorted(images.iterdir())
    answers = {}
    with LiveServer(config) as server:
        server.wait_ready()
        with server.client() as client:
            info = client.get("/v1/info").json()
            for path in paths:
                response = client.post(f"/v1/detect?name={path.name}", content=path.read_bytes(),
                                       headers={"Content-Type": "image/jpeg"})
                assert response.status_code == 200, response.text
                record = response.json()["results"][0]
                answers[record["path"]] = np.array(
                    [[*d["box"], d["confidence"], d["class_id"]] for d in record["detections"]]).reshape(-1, 6)
    assert info["backend"] == "openvino" and info["precision"] == "fp32" and info["export"]["cached"]
    assert assert_same_boxes(reference[str(CONF)], answers) > 200


@pytest.mark.gpu
def test_tensorrt_fp16_matches_torch_fp32_by_iou(detector, images, reference, cache, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    pytest.importorskip("tensorrt")
    config = InferConfig(sources=(str(images),), model=str(detector), out=tmp_path / "trt", imgsz=IMGSZ, conf=CONF,
                         batch=BatchSetting(4), device="0", backend="tensorrt", precision="fp16")
    summary = run_inference(config)
    assert summary.backend == "tensorrt" and summary.precision == "fp16" and summary.failed == 0
    rows = {}
    for line in (tmp_path / "trt" / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows[Path(record["path"]).name] = np.array(
            [[*d["box"], d["confidence"], d["class_id"]] for d in record["detections"]]).reshape(-1, 6)
    total = sum(int((r[:, 4] >= CONF).sum()) for r in rows.values())
    assert total > 200 and matched_share(rows, reference[str(LOW)]) >= BF16_FLOOR
    again = run_inference(InferConfig(**{**config.__dict__, "out": tmp_path / "again"}))
    assert again.export["hit"]


def test_openvino_never_reports_telemetry(detector, images, tmp_path):
    """OpenVINO sends a usage event when imported and at every conversion unless opted out (outside CI): a real
    infer run through an OpenVINO export, in a clean home folder and without CI set, leaves no trace of its
    telemetry (the client id and usage counter it writes before sending)."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "TF_BUILD", "JENKINS_URL"}}
    env.update(HOME=str(home), YOLO_BATCH_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "yolo_batch.cli", "infer", str(images), "--model", str(detector),
                           "--imgsz", "64", "--device", "cpu", "--backend", "openvino", "--precision", "fp32",
                           "--out", str(tmp_path / "out"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "results.jsonl").exists() and not (home / "intel").exists()


def test_bench_infer_times_each_method_with_only_its_own_runtime_alive(detector, images, cache, monkeypatch):
    """A live ONNX Runtime session slows every other one in the process (docs/benchmarks.md), so the peer's
    export and the ceiling's session are dropped after their own timing: none of them is alive while ours runs."""
    import weakref

    from yolo_batch.inference import bench, bench_ceiling

    loaded: list[weakref.ref] = []
    real_load, real_run = bench.ultralytics_adapter.load_export, bench.run_inference
    real_open = bench_ceiling.Ceiling._open

    def load_export(*args, **kwargs):
        export = real_load(*args, **kwargs)
        loaded.append(weakref.ref(export))
        return export

    def open_engine(self):  # the ceiling's: once for its inputs, then once per round
        engine = real_open(self)
        loaded.append(weakref.ref(engine.runtime.session))
        return engine

    alive_during_ours: list[int] = []

    def run_inference(config, *args, **kwargs):
        alive_during_ours.append(sum(ref() is not None for ref in loaded))
        return real_run(config, *args, **kwargs)

    monkeypatch.setattr(bench.ultralytics_adapter, "load_export", load_export)
    monkeypatch.setattr(bench_ceiling.Ceiling, "_open", open_engine)
    monkeypatch.setattr(bench, "run_inference", run_inference)
    result = CliRunner().invoke(main, ["bench", "infer", str(images), "--model", str(detector), "--imgsz", str(IMGSZ),
                                       "--batch", "4", "--device", "cpu", "--backend", "onnxruntime", "--precision",
                                       "fp32", "--repeats", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ratios"]["ours_over_predict_same_backend"] > 0 and report["ratios"]["ours_over_backend_ceiling"] > 0
    assert len(loaded) == 5  # the export and the ceiling's session in each of the two rounds, and the ceiling's inputs
    assert alive_during_ours == [0, 0, 0]  # the warm-up run, then ours in each round
