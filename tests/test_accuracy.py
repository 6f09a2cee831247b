"""bench accuracy: the contract's rules on plain numbers, and the command on a real labelled split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import detector  # noqa: F401 (fixture)

from yolo_batch.cli import main
from yolo_batch.inference.accuracy import (
    accuracy_row,
    correct_at_thresholds,
    judge,
    matched_share,
    within_pixels,
)

BOX = np.array([[10.0, 10.0, 50.0, 50.0, 0.9, 1.0]])


def test_a_box_moved_past_iou_09_or_another_class_is_not_matched():
    moved = BOX.copy()
    moved[0, :4] += [4, 4, 4, 4]  # IoU 0.67
    relabelled = BOX.copy()
    relabelled[0, 5] = 2
    assert matched_share({"a": BOX}, {"a": BOX}) == 1.0
    assert matched_share({"a": BOX}, {"a": moved}) == 0.0
    assert matched_share({"a": BOX}, {"a": relabelled}) == 0.0
    assert matched_share({"a": BOX}, {}) == 0.0  # the image missing on the other side loses its boxes


def test_the_other_side_is_read_at_the_lower_confidence():
    just_below = BOX.copy()
    just_below[0, 4] = 0.2  # below 0.25 there, above 0.1: still the same detection
    assert matched_share({"a": BOX}, {"a": just_below}) == 1.0
    gone = BOX.copy()
    gone[0, 4] = 0.05
    assert matched_share({"a": BOX}, {"a": gone}) == 0.0
    assert matched_share({"a": gone}, {"a": BOX}) == 1.0  # nothing of ours above 0.25: nothing lost


def test_within_pixels_counts_the_reference_boxes():
    nudged = BOX.copy()
    nudged[0, 2] += 0.9
    far = BOX.copy()
    far[0, 2] += 1.5
    assert within_pixels({"a": nudged}, {"a": BOX}) == 1.0
    assert within_pixels({"a": far}, {"a": BOX}) == 0.0


@pytest.mark.parametrize(("precision", "matched", "back", "pixels", "meets"), [
    ("fp32", 1.0, 1.0, 1.0, True),
    ("fp32", 1.0, 1.0, 0.98, False),  # IoU agreement is not enough for fp32: boxes must not move
    ("bf16", 0.99, 0.98, 0.4, True),  # bf16 boxes may move by a pixel
    ("bf16", 0.99, 0.97, 1.0, False),  # both ways
    ("fp16", 0.95, 1.0, 1.0, False),
])
def test_the_contract(precision, matched, back, pixels, meets):
    assert judge("torch", precision, matched, back, pixels)[0] is meets


def test_map_uses_ultralytics_matching_one_prediction_per_label():
    labels = np.array([[10.0, 10.0, 50.0, 50.0, 1.0]])
    twice = np.vstack([BOX, BOX * [1, 1, 1, 1, 0.5, 1]])
    correct = correct_at_thresholds(twice, labels)
    assert correct[0].all() and not correct[1].any()  # the higher IoU/first wins, the duplicate is a false positive
    row = accuracy_row("torch", "fp32", {"a": BOX}, {"a": BOX}, (0.5, 0.25))
    assert (row.map50, row.matched, row.within_1px, row.detections, row.meets) == (0.5, 1.0, 1.0, 1, True)


def test_perfect_predictions_score_full_map_by_ultralytics_ap():
    from yolo_batch.ultralytics_adapter import mean_average_precision

    labels = np.array([[10.0, 10.0, 50.0, 50.0, 0.0], [60.0, 60.0, 90.0, 99.0, 1.0]])
    predictions = np.hstack([labels[:, :4], [[0.9], [0.8]], labels[:, 4:]])
    m50, m = mean_average_precision([correct_at_thresholds(predictions, labels)], [predictions[:, 4]],
                                    [predictions[:, 5]], [labels[:, 4]])
    assert m50 > 0.99 and m > 0.99
    shifted = predictions.copy()
    shifted[:, :4] += 4  # IoU 0.64 and 0.68: counts at 0.5, not at 0.75 and above
    m50, m = mean_average_precision([correct_at_thresholds(shifted, labels)], [shifted[:, 4]], [shifted[:, 5]],
                                    [labels[:, 4]])
    assert m50 > 0.99 and m < 0.5


def bench(*args: str):
    return CliRunner().invoke(main, ["bench", "accuracy", *args])


def test_bench_accuracy_scores_each_runtime_against_torch_fp32(detector):
    from conftest import shared_dataset

    val = shared_dataset("coco8") / "images" / "val"
    result = bench(str(val), "--model", str(detector), "--imgsz", "96", "--device", "cpu", "--batch", "4",
                   "--runtime", "onnxruntime:fp32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["runtime"] for r in report["rows"]] == ["torch:fp32", "onnxruntime:fp32"]
    assert report["images"] == 4 and report["labels"] == 17  # coco8's val split (datasets README)
    reference, onnx = report["rows"]
    assert reference["matched"] == reference["within_1px"] == 1.0 and reference["detections"] > 50
    assert onnx["within_1px"] >= 0.99 and onnx["meets"] and report["all_meet"]
    assert 0.0 <= onnx["map50_95"] <= onnx["map50"] <= 1.0
    assert abs(onnx["map50"] - reference["map50"]) < 0.01  # the same boxes score the same


def test_the_report_table_names_every_runtime_in_full_on_a_narrow_terminal():
    from rich.console import Console

    from yolo_batch.inference.accuracy import AccuracyReport, accuracy_row

    same = {"a.jpg": np.array([[10, 10, 50, 50, 0.9, 0]], float)}
    rows = tuple(accuracy_row(b, p, same, same, (0.5, 0.3))
                 for b, p in (("torch", "fp32"), ("openvino", "bf16"), ("onnxruntime", "fp32")))
    console = Console(width=80, record=True)
    console.print(AccuracyReport("bccd.pt", 1, 1, 320, "cpu", rows).table())
    text = console.export_text()
    assert all(name in text for name in ("torch:fp32", "openvino:bf16", "onnxruntime:fp32")), text


@pytest.mark.parametrize(("args", "message"), [
    (["--runtime", "openvino"], "runtime 'openvino' is not BACKEND:PRECISION"),
    (["--runtime", "auto:fp32"], "runtime 'auto:fp32' is not BACKEND:PRECISION"),
    (["--model", "yolo11n.yaml"], "bench accuracy needs trained weights (a .pt file)"),
])
def test_bench_accuracy_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    (tmp_path / "m.pt").write_bytes(b"")
    full = [str(tmp_path), "--model", str(tmp_path / "m.pt"), *args] if "--model" not in args else [str(tmp_path),
                                                                                                  *args]
    result = bench(*full)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_accuracy_without_labels_says_what_it_needs(detector, tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((64, 64, 3), 128, np.uint8))
    result = bench(str(tmp_path), "--model", str(detector), "--imgsz", "64", "--device", "cpu",
                   "--runtime", "torch:fp32")
    assert result.exit_code == 2 and "no labels found" in result.stderr


def test_torch_bf16_runs_the_stem_and_the_detection_head_in_fp32(detector):
    """The body runs in bf16 under autocast; the head (DFL box decoding, class logits) and the stem (which sees
    pixel / 255, not exact in bf16) in fp32: what brought torch bf16 to the contract on the BCCD models
    (docs/benchmarks.md)."""
    import torch

    from yolo_batch import ultralytics_adapter
    from yolo_batch.inference.runtimes.torch import TorchRuntime

    bf16, _ = TorchRuntime.load(str(detector), torch.device("cpu"), "bf16")
    fp32, _ = TorchRuntime.load(str(detector), torch.device("cpu"), "fp32")
    whole = ultralytics_adapter.inference_network(ultralytics_adapter.load_model(str(detector)), torch.device("cpu"),
                                                  False, True)
    everything_bf16 = TorchRuntime(whole, "bf16")
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8))
    reference = fp32(batch)
    ends_fp32, all_bf16 = bf16(batch), everything_bf16(batch)
    assert ends_fp32.shape == reference.shape and bf16.network.end2end == fp32.network.end2end
    box_error = (ends_fp32[:, :4] - reference[:, :4]).abs().max()
    assert box_error < (all_bf16[:, :4] - reference[:, :4]).abs().max()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = [torch.randn(1, c, s, s) for c, s in ((64, 12), (128, 6), (256, 3))]
        layers = bf16.thread_module().model
        assert layers[-1](features)[0].dtype == torch.float32
        assert layers[0](torch.rand(1, 3, 32, 32)).dtype == torch.float32
        assert layers[1](torch.rand(1, 16, 16, 16)).dtype == torch.bfloat16  # the body


def test_a_label_file_that_is_not_numbers_is_one_line(tmp_path):
    from yolo_batch.errors import InputError
    from yolo_batch.inference.accuracy_bench import read_labels

    good = tmp_path / "good.txt"
    good.write_text("1 0.5 0.5 0.2 0.4\n\n2 0.1 0.1 0.3 0.1 0.3 0.3\n")
    assert read_labels(good, 100, 50).tolist() == [[40.0, 15.0, 60.0, 35.0, 1.0], [10.0, 5.0, 30.0, 15.0, 2.0]]
    bad = tmp_path / "bad.txt"
    bad.write_text("1 0.5 0.5 0.2 0.4\nsee the README\n")
    with pytest.raises(InputError, match=r"bad.txt:2: not a label row"):
        read_labels(bad, 100, 50)
