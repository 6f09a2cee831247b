"""The cluster path without a cluster: ``--cluster`` parsing, the actor plan (plain numbers), the worker steps, and
the one line a user gets without Ray installed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import detector, image_folder, write_bad_files  # noqa: F401 (fixtures)

from yolo_batch.cli import main
from yolo_batch.errors import InputError
from yolo_batch.inference.cluster.plan import ClusterConfig, ClusterResources, plan_cluster
from yolo_batch.inference.throughput import AUTO_MAX_BATCH

CPU2 = ClusterResources(nodes=1, cpus=2, gpus=0)
GPU_NODES = ClusterResources(nodes=2, cpus=32, gpus=8)


@pytest.mark.parametrize("text, engine, address", [
    ("ray", "ray", None),
    ("RAY", "ray", None),
    ("ray:auto", "ray", "auto"),
    ("ray:10.0.0.5:6379", "ray", "10.0.0.5:6379"),
    ("ray:ray://head:10001", "ray", "ray://head:10001"),
])
def test_cluster_names(text, engine, address):
    parsed = ClusterConfig.parse(text)
    assert (parsed.engine, parsed.address) == (engine, address)


@pytest.mark.parametrize("text, actors, gpus, message", [
    ("spark", None, None, "'ray' or 'ray:ADDRESS'"),
    ("ray:", None, None, "give an address"),
    ("ray", 0, None, "actors must be"),
    ("ray", None, -1.0, "gpus-per-actor must be >= 0"),
])
def test_bad_cluster_settings(text, actors, gpus, message):
    with pytest.raises(InputError, match=message):
        ClusterConfig.parse(text, actors=actors, gpus_per_actor=gpus)


@pytest.mark.parametrize("resources, cluster, device, threads, batch, expected", [
    # (actors, cpus per actor, gpus per actor, rows per call, rows per task)
    (CPU2, ClusterConfig(), None, None, 4, (1, 1.0, 0.0, 4, 4)),  # this box: one actor, one core decodes
    (ClusterResources(1, 16, 0), ClusterConfig(), "cpu", 2, 16, (6, 2.0, 0.0, 16, 16)),
    (GPU_NODES, ClusterConfig(), None, None, None, (8, 1.0, 1.0, AUTO_MAX_BATCH["cuda"], 16)),  # one per GPU
    (GPU_NODES, ClusterConfig(gpus_per_actor=0.5), None, None, 64, (16, 1.0, 0.5, 64, 16)),  # two per GPU
    (GPU_NODES, ClusterConfig(actors=3), None, None, 8, (3, 1.0, 1.0, 8, 8)),
    (GPU_NODES, ClusterConfig(), "cpu", None, None, (24, 1.0, 0.0, AUTO_MAX_BATCH["cpu"], 16)),  # --device cpu
])
def test_actor_plan(resources, cluster, device, threads, batch, expected):
    plan = plan_cluster(resources, cluster, device, threads, batch, AUTO_MAX_BATCH)
    assert (plan.actors, plan.cpus_per_actor, plan.gpus_per_actor, plan.rows_per_call, plan.rows_per_task) == expected
    assert plan.device == ("0" if plan.gpus_per_actor else "cpu") and "decode" in plan.reason


@pytest.mark.parametrize("resources, cluster, device, message", [
    (CPU2, ClusterConfig(actors=2), None, "leave no CPU for decoding"),
    (CPU2, ClusterConfig(gpus_per_actor=1), None, "the cluster has 0 GPU"),
    (GPU_NODES, ClusterConfig(actors=9), None, "needs 9 GPUs; the cluster has 8"),
    (GPU_NODES, ClusterConfig(gpus_per_actor=1), "cpu", "contradict"),
    (GPU_NODES, ClusterConfig(), "0", "Ray assigns each actor its GPU"),
])
def test_pools_the_cluster_cannot_hold_are_refused(resources, cluster, device, message):
    with pytest.raises(InputError, match=message):
        plan_cluster(resources, cluster, device, None, 4, AUTO_MAX_BATCH)


def test_without_ray_one_line_names_the_extra_and_exit_2(image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra gives: ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    result = CliRunner().invoke(main, ["infer", str(image_folder), "--cluster", "ray", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --cluster ray needs Ray Data, which is not installed: pip install 'yolo-batch[ray]'"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--actors", "2"], "need a cluster"),
    (["--cluster", "dask"], "'ray' or 'ray:ADDRESS'"),
    (["--cluster", "ray", "--device", "0"], "Ray assigns each actor its GPU"),
    (["--cluster", "ray", "--workers", "2"], "--workers and --streams are local infer's"),
    (["--cluster", "ray:127.0.0.1:1"], "nothing answers at 127.0.0.1:1"),  # not minutes of Ray's own retries
])
def test_cluster_usage_errors_exit_2(image_folder, tmp_path, args, message):
    result = CliRunner().invoke(main, ["infer", str(image_folder), *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_worker_steps_without_a_cluster_match_local_infer(detector, image_folder, tmp_path):
    """The decode task and the actor's callable on plain blocks: the same records as local infer, failures kept."""
    import torch

    from yolo_batch.api import build_infer_config
    from yolo_batch.inference.cluster.work import InferWorker, WorkSpec, prepare_block
    from yolo_batch.inference.decode import DecodeLimits
    from yolo_batch.inference.engine import NmsSettings
    from yolo_batch.inference.runner import run_inference
    from yolo_batch.inference.runtimes.loader import resolve_runtime
    from yolo_batch.inference.writers import FailureRecord

    bad = write_bad_files(image_folder)
    config = build_infer_config(str(image_folder), model=detector, batch=3, imgsz=64, conf=0.15, device="cpu",
                                backend="torch", precision="fp32", out=tmp_path / "local")
    run_inference(config)
    lines = (tmp_path / "local" / "results.jsonl").read_text().splitlines()
    local = {r["path"]: r["detections"] for r in map(json.loads, lines)}
    spec = WorkSpec(imgsz=64, stride=32, limits=DecodeLimits(config.max_file_bytes, config.max_pixels), window=None,
                    jpeg="opencv", keep_originals=False, runtime=resolve_runtime("torch", "fp32", torch.device("cpu")),
                    nms=NmsSettings(0.15), batch=3, max_batch=3, max_latency_ms=None, threads=1, device="cpu")
    paths = np.array(sorted(str(p) for p in image_folder.iterdir()), dtype=object)
    prepared = prepare_block({"path": paths}, spec)
    out = InferWorker(spec, detector)(prepared)
    results = {r.path: r for r in out["result"]}
    assert set(results) == set(paths)
    assert {p.split("/")[-1]: r.kind for p, r in results.items() if isinstance(r, FailureRecord)} == bad
    assert {p: [d.to_dict() for d in r.detections] for p, r in results.items()
            if not isinstance(r, FailureRecord)} == local
    report = out["report"][0]
    assert report.images == len(local) and report.failed == len(bad) and report.batch == 3
    assert all(r is None for r in out["report"][1:])


def test_only_the_ray_backend_imports_ray():
    root = Path(__file__).resolve().parents[1] / "yolo_batch"
    importers = {str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r"^\s*(import ray\b|from ray\b)", p.read_text(), re.MULTILINE)}
    assert importers == {"inference/cluster/ray_backend.py"}


def test_a_yaml_model_is_saved_once_so_every_actor_loads_the_same_weights(tmp_path):
    import torch

    from yolo_batch.ultralytics_adapter import load_model, portable_model

    saved = portable_model("yolo11n.yaml", tmp_path)
    assert saved.path == tmp_path / "yolo11n.pt" and saved.stride == 32 and len(saved.names) == 80
    first, second = (load_model(str(saved.path)).model.state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)  # two loads: the same weights
    assert portable_model(str(saved.path), tmp_path / "unused").path == saved.path  # a .pt is used as it is


def test_a_cluster_started_here_never_reports_usage_statistics(monkeypatch):
    """Ray's processes read the opt-out at start; yolo-batch sets it for ray.init only and puts it back."""
    import os
    import types

    from yolo_batch.inference.cluster import ray_backend

    seen = []
    fake = types.SimpleNamespace(
        __version__="2.60.0", is_initialized=lambda: False, shutdown=lambda: None,
        init=lambda **kwargs: seen.append(os.environ.get("RAY_USAGE_STATS_ENABLED")),
        get_runtime_context=lambda: types.SimpleNamespace(gcs_address="127.0.0.1:1"))
    monkeypatch.setattr(ray_backend, "import_ray", lambda: fake)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    with ray_backend.connect(ClusterConfig()):
        pass
    assert seen == ["0"] and os.environ["RAY_USAGE_STATS_ENABLED"] == "1"
