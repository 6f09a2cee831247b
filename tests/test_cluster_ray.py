"""``infer --cluster ray`` on a local Ray cluster (2 CPUs) started once for the module.

Same results as local ``infer`` (records, failures, CSV, labels); an actor killed mid-run (Ray restarts it) and a
driver killed mid-run (then the same command again) both leave every image exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import detector, image_folder, kill_when_written, write_bad_files  # noqa: F401 (fixtures)

from yolo_batch.cli import main

SETTINGS = ["--imgsz", "64", "--conf", "0.15", "--device", "cpu", "--backend", "torch", "--precision", "fp32"]
ACTOR_TITLE = b"RayInferWorker"  # Ray names an actor's process after its class: ray::MapWorker(MapBatches(...))


@pytest.fixture(scope="module")
def ray_address():
    """One local cluster for every test here: starting one takes 10-20 s on the shared 2-core box."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("ray is not installed (the dev extra includes it; required under CI)")
        pytest.skip("ray is not installed: pip install 'yolo-batch[ray]'")
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # the suite stays offline, as the product does (ray_backend)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


def infer(*args: str):
    return CliRunner().invoke(main, ["infer", *args], catch_exceptions=False)


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def many_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    base = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    paths = [folder / f"{i:03d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        cv2.imwrite(str(path), np.roll(base, i, axis=1))
    return paths


@pytest.mark.slow
def test_same_results_and_failures_as_local_infer(ray_address, detector, image_folder, tmp_path):
    bad = write_bad_files(image_folder)
    common = [str(image_folder), "--model", str(detector), *SETTINGS, "--batch", "3", "--format", "csv",
              "--format", "yolo-txt", "--save-annotated", "--json"]
    local = infer(*common, "--out", str(tmp_path / "local"))
    remote = infer(*common, "--out", str(tmp_path / "ray"), "--cluster", "ray")
    assert local.exit_code == remote.exit_code == 3, remote.output  # bad files: exit 3, as local infer
    records = {r["path"]: r["detections"] for r in journal(tmp_path / "local")}
    clustered = {r["path"]: r["detections"] for r in journal(tmp_path / "ray")}
    assert clustered == records and sum(map(len, records.values())) > 0
    errors = {Path(e["path"]).name: e["kind"]
              for e in map(json.loads, (tmp_path / "ray" / "errors.jsonl").read_text().splitlines())}
    assert errors == bad
    csv = [sorted((tmp_path / name / "results.csv").read_text().splitlines()) for name in ("local", "ray")]
    assert csv[0] == csv[1]
    labels = [{p.name: p.read_text() for p in (tmp_path / name / "labels").rglob("*.txt")} for name in ("local", "ray")]
    assert labels[0] == labels[1] and len(labels[0]) == 8
    drawn = [{p.name: cv2.imread(str(p)) for p in (tmp_path / name / "annotated").rglob("*.jpg")}
             for name in ("local", "ray")]  # the decoded originals travel to the driver, which draws them
    assert drawn[0].keys() == drawn[1].keys() and len(drawn[0]) == 8
    assert all(np.array_equal(drawn[0][name], drawn[1][name]) for name in drawn[0])
    summary = json.loads(remote.stdout)
    assert summary["processed"] == 8 and summary["failed"] == len(bad)
    cluster = summary["cluster"]
    assert cluster["resources"]["cpus"] == 2 and cluster["plan"]["actors"] == 1
    assert sum(a["images"] for a in cluster["per_actor"]) == 8 and cluster["per_actor"][0]["images_per_s"] > 0

    import yolo_batch

    values = list(yolo_batch.iter_detections(str(image_folder), model=detector, batch=3, imgsz=64, conf=0.15,
                                             device="cpu", backend="torch", precision="fp32", cluster="ray"))
    assert {v.path: v.class_id.tolist() for v in values if v.ok} == {
        p: [d["class_id"] for d in found] for p, found in records.items()}
    assert {Path(v.path).name for v in values if not v.ok} == set(bad)

    again = infer(*common, "--out", str(tmp_path / "ray"), "--cluster", "ray")  # resume: nothing left but the bad
    resumed = json.loads(again.stdout)
    assert resumed["done_before"] == 8 and resumed["processed"] == 0 and resumed["failed"] == len(bad)
    assert len(journal(tmp_path / "ray")) == 8


class KillAnActor:
    """A progress reporter that SIGKILLs the inference actor's process once ``after`` images are written."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.killed: int | None = None

    def task(self, *args, **kwargs):
        return self

    def note(self, text: str) -> None:
        pass

    def start(self, total, done_before=0) -> None:
        pass

    def stop(self) -> None:
        pass

    def update(self, done: int, failed: int = 0) -> None:
        if self.killed is None and done >= self.after:
            self.killed = actor_pid()
            os.kill(self.killed, signal.SIGKILL)


def actor_pid() -> int:
    """The newest inference actor's process (an earlier test's pool may still be shutting down)."""
    found: list[tuple[int, int]] = []  # (start time in clock ticks, pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ACTOR_TITLE in (entry / "cmdline").read_bytes():
                    stat = (entry / "stat").read_text()
                    found.append((int(stat.rsplit(")", 1)[1].split()[19]), int(entry.name)))
            except OSError:
                continue
    assert found, "no inference actor process found"
    return max(found)[1]


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_restarted_and_every_image_is_written_once(ray_address, detector, tmp_path):
    import yolo_batch

    paths = many_images(tmp_path / "many", 60)
    killer = KillAnActor(after=6)
    summary = yolo_batch.infer(str(tmp_path / "many"), model=detector, out=tmp_path / "out", batch=2, imgsz=64,
                               conf=0.15, device="cpu", backend="torch", precision="fp32", cluster="ray",
                               progress=killer)
    assert killer.killed is not None
    assert summary.processed == 60 and summary.failed == 0
    assert Counter(r["path"] for r in journal(tmp_path / "out")) == Counter(str(p) for p in paths)
    actors = summary.cluster["per_actor"]
    assert len(actors) == 2 and any(a["actor"].endswith(f":{killer.killed}") for a in actors)  # restarted: new pid


@pytest.mark.slow
def test_a_driver_killed_mid_run_then_rerun_writes_every_image_once(ray_address, detector, tmp_path):
    paths = many_images(tmp_path / "many", 300)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "yolo_batch.cli", "infer", str(tmp_path / "many"), "--model", str(detector),
               *SETTINGS, "--batch", "2", "--out", str(out), "--quiet", "--format", "csv",
               "--cluster", f"ray:{ray_address}"]
    results = out / "results.jsonl"
    kill_when_written(command, results, 10, 180)
    before = results.read_text().count("\n")
    assert 10 <= before < 300, "the driver should have been killed mid-way"
    with open(results, "a") as handle:  # what a kill during a write leaves: half a line
        handle.write('{"path": "' + str(paths[-1]) + '", "width": 1')

    # The same command from this (connected) driver, with --batch auto: the batch does not change results, and
    # each actor measures its own.
    rerun = infer(*[("auto" if a == "2" else a) for a in command[4:-2]], "--json", "--cluster", "ray")
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    assert summary["batch_choice"]["batch"] == summary["cluster"]["per_actor"][0]["batch"]
    assert summary["done_before"] == before and summary["processed"] == 300 - before
    assert summary["journal_dropped_lines"] == 1
    assert Counter(r["path"] for r in journal(out)) == Counter(str(p) for p in paths)
    csv_paths = {row.split(",")[0] for row in (out / "results.csv").read_text().splitlines()[1:]}
    assert csv_paths == {r["path"] for r in journal(out) if r["detections"]}


@pytest.mark.slow
def test_bench_infer_cluster_reports_local_and_ray_on_the_same_images(ray_address, detector, image_folder):
    result = CliRunner().invoke(main, ["bench", "infer", str(image_folder), "--model", str(detector), *SETTINGS,
                                       "--batch", "4", "--cluster", "ray", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 8 and report["same_results"] is True
    assert set(report["images_per_s"]) == {"local infer", "ray infer"} and all(report["images_per_s"].values())
    assert set(report["ratios"]) == {"ray_over_local_images_per_s", "ray_over_local_wall"}
    assert [r["images"] for r in report["runs"]] == [8, 8] and report["cluster"]["plan"]["actors"] == 1


def test_a_folder_that_could_not_be_listed_counts_as_failed_as_in_local_infer(ray_address, detector, tmp_path,
                                                                              monkeypatch):
    """Discovery's unlisted folders are errors.jsonl lines and failures (exit 3) on both paths. (root lists any
    folder, so discovery is given one it could not list.)"""
    import dataclasses

    from yolo_batch.inference import runner
    from yolo_batch.inference.cluster import run as cluster_run
    from yolo_batch.inference.failures import FailureRecord

    many_images(tmp_path / "src", 3)
    locked = FailureRecord(str(tmp_path / "src" / "locked"), "unreadable", "cannot list folder: permission denied")
    real = runner.discover

    def discover(sources):
        return dataclasses.replace(real(sources), problems=(locked,))

    monkeypatch.setattr(runner, "discover", discover)
    monkeypatch.setattr(cluster_run, "discover", discover)
    for name, extra in (("local", []), ("ray", ["--cluster", "ray"])):
        out = tmp_path / name
        result = infer(str(tmp_path / "src"), "--model", str(detector), *SETTINGS, "--out", str(out), "--json", *extra)
        assert result.exit_code == 3, (name, result.output)
        assert json.loads(result.stdout)["failed"] == 1 and len(journal(out)) == 3
        assert [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()] == [locked.to_dict()]
