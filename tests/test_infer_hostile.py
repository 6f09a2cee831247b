"""Issue 13, the ``infer`` side: hostile input and hard operations that must give one line and exit 2, an
error line, or a kept result, never silent loss, a hang or unbounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import detector, image_folder  # noqa: F401 (fixtures)
from unprivileged import as_nobody, refusal_as_nobody

from yolo_batch.cli import main
from yolo_batch.core.images import to_uint8
from yolo_batch.inference.decode import DecodeError, DecodeLimits, FailureKind, ImageReader
from yolo_batch.inference.sources import discover

FAST = ["--imgsz", "64", "--conf", "0.15", "--device", "cpu", "--backend", "torch", "--precision", "fp32"]


def infer(*args: str) -> Any:
    return CliRunner().invoke(main, ["infer", *args], catch_exceptions=False)


def one_line_exit_2(result: Any, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def errors(out: Path) -> list[dict]:
    path = out / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder everyone can enter (pytest's tmp_path is private to its owner, so 'nobody' cannot)."""
    folder = Path(tempfile.mkdtemp(prefix="yolo-batch-hostile-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        for root, dirs, _ in os.walk(folder):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(folder, ignore_errors=True)


def small_images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return folder


# 1. resume identifies weights by content -------------------------------------------------------------------------

def test_resume_refuses_other_weights_at_the_same_path(detector, image_folder, tmp_path):
    from yolo_batch.ultralytics_adapter import load_model

    weights = tmp_path / "best.pt"
    shutil.copy(detector, weights)
    (tmp_path / "x").mkdir()
    out = tmp_path / "o"
    assert infer(str(image_folder), "--model", str(weights), *FAST, "--out", str(out), "--quiet").exit_code == 0
    same = infer(str(image_folder), "--model", str(tmp_path / "." / "x" / ".." / "best.pt"), *FAST,
                 "--out", str(out), "--json")  # the same file by another path: resumes
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["done_before"] == 8

    load_model("yolo11n.yaml").save(str(weights))  # retrained: new content at the same path
    cv2.imwrite(str(image_folder / "new.jpg"), np.full((40, 40, 3), 90, np.uint8))
    refused = infer(str(image_folder), "--model", str(weights), *FAST, "--out", str(out))
    one_line_exit_2(refused, "weights", "--overwrite")
    assert len(journal(out)) == 8
    fresh = infer(str(image_folder), "--model", str(weights), *FAST, "--out", str(out), "--overwrite", "--quiet")
    assert fresh.exit_code == 0 and len(journal(out)) == 9


def test_model_fingerprint_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    from yolo_batch.core import models

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"PK\x03\x04" + b"a" * 100)
    calls: list[Path] = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(Path(p)) or real(p))
    first = models.model_fingerprint(str(weights))
    assert models.model_fingerprint(str(weights)) == first and len(calls) == 1  # cached
    weights.write_bytes(b"PK\x03\x04" + b"b" * 100)  # same size: the mtime tells
    os.utime(weights, ns=(1, 1))
    assert models.model_fingerprint(str(weights)) != first and len(calls) == 2


# 2. same stem, two images ----------------------------------------------------------------------------------------

def test_same_stem_images_keep_both_label_files_and_annotated_copies(detector, tmp_path):
    folder = small_images(tmp_path / "src", ["x.jpg", "x.png", "y.jpg"])
    out = tmp_path / "o"
    result = infer(str(folder), "--model", str(detector), *FAST, "--out", str(out), "--format", "yolo-txt",
                   "--save-annotated", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["x.jpg.txt", "x.png.txt", "y.txt"]
    assert sorted(p.name for p in (out / "annotated").iterdir()) == ["x.jpg", "x.png", "y.jpg"]


def test_annotated_copy_in_a_format_opencv_cannot_write_does_not_replace_another(tmp_path, monkeypatch):
    from yolo_batch.inference import writers

    real = cv2.imwrite
    monkeypatch.setattr(writers.cv2, "imwrite", lambda p, im: False if p.endswith(".webp") else real(p, im))
    image = np.full((8, 8, 3), 50, np.uint8)
    names = {"/s/x.png": "x.png", "/s/x.webp": "x.webp"}
    with writers.ResultWriter(tmp_path, [], True, names) as writer:
        for path in names:
            writer.write_batch([writers.ImageRecord(path, 8, 8, ())], {path: image})
    assert sorted(p.name for p in (tmp_path / "annotated").iterdir()) == ["x.png", "x.webp.png"]


# 3. deep images: bounded memory ----------------------------------------------------------------------------------

def test_16_bit_conversion_makes_no_float_copy_of_the_whole_image():
    image = np.random.default_rng(0).integers(0, 4096, (1500, 1000, 3), dtype=np.uint16)
    expected = to_uint8(image[:10], (0, 4095))  # the same arithmetic on a strip
    tracemalloc.start()
    try:
        converted = to_uint8(image, (0, 4095))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(converted[:10], expected)
    assert peak < 1.5 * converted.nbytes  # the 8-bit result and a strip, not 4-byte floats of every pixel


def test_own_range_scaling_is_unchanged_by_working_in_strips():
    image = np.random.default_rng(1).integers(100, 3000, (700, 900), dtype=np.uint16)
    floats = image.astype(np.float32)
    expected = np.clip((floats - image.min()) * (255.0 / (image.max() - image.min())) + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(to_uint8(image, channels=1), expected)


def test_large_decodes_wait_for_memory_held_by_others():
    png = cv2.imencode(".png", np.zeros((300, 400, 3), np.uint16))[1].tobytes()
    need = 300 * 400 * 3 * 2
    reader = ImageReader(DecodeLimits(1 << 30, 1 << 30), decode_memory_bytes=need * 3 // 2)
    assert reader.budget.capacity == need * 3 // 2
    from yolo_batch.inference.decode_memory import decode_bytes_needed

    seen: list[int] = []
    real = cv2.imdecode

    def spy(data: Any, flags: int) -> Any:
        seen.append(reader.budget.in_use)
        return real(data, flags)

    held = reader.budget.acquire(need)  # another decode holds most of the memory
    assert not reader.budget.try_acquire(decode_bytes_needed(png, "png", (400, 300)))
    reader.budget.release(held)
    cv2_module = sys.modules["yolo_batch.inference.decode"].cv2
    original = cv2_module.imdecode
    cv2_module.imdecode = spy
    try:
        assert reader.read_bytes(png, "x.png").pixels.shape == (300, 400, 3)
    finally:
        cv2_module.imdecode = original
    assert seen and seen[0] >= need and reader.budget.in_use == 0  # held while decoding, given back after


# 4. FIFOs and other non-files -------------------------------------------------------------------------------------

def test_fifo_among_the_images_is_an_error_line_not_a_hang(detector, tmp_path):
    folder = small_images(tmp_path / "src", ["a.jpg", "b.jpg"])
    os.mkfifo(folder / "pipe.jpg")
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-m", "yolo_batch.cli", "infer", str(folder), "--model", str(detector),
                           *FAST, "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert sorted(Path(r["path"]).name for r in journal(out)) == ["a.jpg", "b.jpg"]
    assert [(Path(e["path"]).name, e["kind"]) for e in errors(out)] == [("pipe.jpg", "not-a-file")]


def test_reader_refuses_a_character_device():
    reader = ImageReader(DecodeLimits(1 << 20, 1 << 20))
    with pytest.raises(DecodeError) as info:
        reader.read("/dev/zero")
    assert info.value.kind is FailureKind.NOT_A_FILE


# 5, 11. bounds on sizes and parallelism --------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--imgsz", "99968"], ["imgsz", "at most"]),
    (["--imgsz", "8192"], ["imgsz", "memory"]),  # allowed by the fixed bound; this machine cannot hold it
    (["--workers", "100000"], ["workers", "at most", "cores"]),
    (["--threads", "10000"], ["threads", "at most", "cores"]),
    (["--streams", "10000"], ["streams", "at most", "cores"]),
])
def test_unbounded_sizes_and_parallelism_are_refused(image_folder, tmp_path, args, words, monkeypatch):
    from yolo_batch.inference import runner

    monkeypatch.setattr(runner, "available_host_bytes", lambda: 4 << 30)  # a 4 GiB machine, whatever runs this
    out = tmp_path / "o"
    one_line_exit_2(infer(str(image_folder), *FAST, *args, "--out", str(out)), *words)
    assert not out.exists()


def test_parallelism_cap_is_a_multiple_of_the_cores():
    from yolo_batch.core.checks import parallelism_cap

    assert parallelism_cap(2) == 8 and parallelism_cap(64) == 256


# 6. permissions ----------------------------------------------------------------------------------------------------

def test_results_journal_that_is_a_folder_is_one_line(image_folder, tmp_path):
    out = tmp_path / "o"
    (out / "results.jsonl").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    one_line_exit_2(infer(str(image_folder), *FAST, "--out", str(out)), "results.jsonl", "folder")


@pytest.mark.parametrize("layout, words", [
    ("parent-read-only", ["cannot write to --out", "permission denied"]),
    ("out-read-only", ["cannot write to --out", "permission denied"]),
    ("journal-read-only", ["cannot write", "results.jsonl", "permission denied"]),
])
def test_unwritable_output_is_refused_before_any_work(open_tmp, layout, words):
    from yolo_batch.inference.config import InferConfig
    from yolo_batch.inference.output import check_output

    parent = open_tmp / "parent"
    parent.mkdir()
    parent.chmod(0o777)
    out = parent / "out"
    if layout == "parent-read-only":
        parent.chmod(0o555)
    else:
        out.mkdir()
        (out / "run.json").write_text("{}")
        (out / "results.jsonl").write_text("")
        (out / "results.jsonl").chmod(0o444 if layout == "journal-read-only" else 0o666)
        out.chmod(0o555 if layout == "out-read-only" else 0o777)
    config = InferConfig(sources=("x",), out=out)
    choice = types.SimpleNamespace(backend="torch", precision="fp32")
    message = refusal_as_nobody(lambda: check_output(config, choice, "pt:0"))  # type: ignore[arg-type]
    assert all(w in message for w in words), message


# 12. skipped folders are reported ----------------------------------------------------------------------------------

def test_unreadable_subfolder_is_reported_not_skipped(open_tmp):
    source = small_images(open_tmp / "src", ["a.jpg"])
    small_images(source / "locked", ["b.jpg"])
    source.chmod(0o755)
    (source / "locked").chmod(0o700)  # root's own: 'nobody' cannot list it

    def run() -> dict[str, Any]:
        found = discover([str(source)])
        return {"paths": list(found.paths), "problems": [p.to_dict() for p in found.problems]}

    found = as_nobody(run)
    assert [Path(p).name for p in found["paths"]] == ["a.jpg"]
    assert found["problems"] == [{"path": str(source / "locked"), "kind": "unreadable",
                                  "reason": "cannot list folder: permission denied"}]


def test_unreadable_source_folder_says_permission_denied(open_tmp):
    source = small_images(open_tmp / "src", ["a.jpg"])
    source.chmod(0o700)
    message = refusal_as_nobody(lambda: discover([str(source)]))
    assert "permission denied" in message and "no images found" not in message, message


def test_symlinked_folders_are_followed_once_each(tmp_path, caplog):
    real = small_images(tmp_path / "real", ["a.jpg"])
    source = small_images(tmp_path / "src", ["b.jpg"])
    (source / "linked").symlink_to(real, target_is_directory=True)
    (source / "loop").symlink_to(source, target_is_directory=True)
    found = discover([str(source)])
    assert found.paths == (str(source / "b.jpg"), str(source / "linked" / "a.jpg"))
    assert found.problems == () and found.repeats == (str(source / "loop"),)
    assert "passed over 1 link(s) to a folder already walked" in caplog.text


def test_unlisted_subfolders_reach_errors_jsonl_and_exit_3(detector, tmp_path, monkeypatch):
    from yolo_batch.inference import runner
    from yolo_batch.inference.failures import FailureRecord
    from yolo_batch.inference.sources import Discovery

    folder = small_images(tmp_path / "src", ["a.jpg"])
    locked = FailureRecord(str(folder / "locked"), "unreadable", "cannot list folder: permission denied")
    monkeypatch.setattr(runner, "discover", lambda sources: Discovery((str(folder / "a.jpg"),), problems=(locked,)))
    out = tmp_path / "o"
    result = infer(str(folder), "--model", str(detector), *FAST, "--out", str(out), "--json")
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout)["failed"] == 1
    assert errors(out) == [locked.to_dict()]
    assert [Path(r["path"]).name for r in journal(out)] == ["a.jpg"]
    again = infer(str(folder), "--model", str(detector), *FAST, "--out", str(out), "--json")
    assert again.exit_code == 3 and errors(out) == [locked.to_dict()]  # reported again, not lost on resume


# 14. smaller ones --------------------------------------------------------------------------------------------------

def test_datasets_make_names_the_cli_flag(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["datasets", "make", "shapes", str(tmp_path)])
    one_line_exit_2(result, "--overwrite")
    assert "overwrite=True" not in result.output


@pytest.mark.parametrize("content", [b"hello, I am text\n", b"PK\x03\x04truncated zip"])
def test_a_pt_that_is_not_weights_never_suggests_a_download(image_folder, tmp_path, content):
    fake = tmp_path / "best.pt"
    fake.write_bytes(content)
    result = infer(str(image_folder), "--model", str(fake), "--imgsz", "64", "--device", "cpu",
                   "--out", str(tmp_path / "o"))
    one_line_exit_2(result, "best.pt")
    for word in ("download", "yolo predict", "yolo26n", "exporting"):
        assert word not in result.output
    assert not (tmp_path / "o").exists()


def test_classes_beyond_the_model_are_refused(detector, image_folder, tmp_path):
    out = tmp_path / "o"
    one_line_exit_2(infer(str(image_folder), "--model", str(detector), *FAST, "--classes", "2,999",
                          "--out", str(out)), "999", "80 classes")
    assert not out.exists()


@pytest.mark.parametrize("name", ["results.csv", "summary.json", "results.jsonl"])
def test_unrelated_files_in_out_are_not_replaced_without_notice(detector, image_folder, tmp_path, name):
    out = tmp_path / "o"
    out.mkdir()
    (out / name).write_text("someone else's file\n")
    one_line_exit_2(infer(str(image_folder), "--model", str(detector), *FAST, "--out", str(out),
                          "--format", "csv"), name, "--overwrite")
    assert (out / name).read_text() == "someone else's file\n"
    replaced = infer(str(image_folder), "--model", str(detector), *FAST, "--out", str(out), "--format", "csv",
                     "--overwrite", "--quiet")
    assert replaced.exit_code == 0 and len(journal(out)) == 8
