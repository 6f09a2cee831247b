"""``bench infer --cluster``: the cluster path against local ``infer`` on the same images, model and settings.

Each round runs local :func:`~yolo_batch.inference.runner.run_inference` and
:func:`~.run.run_cluster_inference` into fresh scratch folders, interleaved so that background load hits both
alike; the driver stays connected across rounds (a cluster is joined once, as a user's session would). Two
figures per method: img/s while images flow (local: the pipeline's; cluster: from submitting the dataset to its
last block, so actor start-up and model loading count) and the whole call's wall time. The results are compared
too: both paths must write the same detections for every image.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from yolo_batch import ultralytics_adapter
from yolo_batch.errors import InputError
from yolo_batch.inference.bench import best_rounds
from yolo_batch.inference.cluster.plan import ClusterConfig
from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.runner import run_inference
from yolo_batch.inference.summary import InferenceSummary
from yolo_batch.inference.writers import journal_records

LOCAL = "local infer"
CLUSTER = "ray infer"


@dataclass(frozen=True)
class ClusterBenchRun:
    method: str
    round: int
    images: int
    images_per_s: float
    wall_s: float


@dataclass(frozen=True)
class ClusterBenchReport:
    images: int
    model: str
    imgsz: int
    batch: str
    cluster: dict[str, Any]  # the last cluster run's summary section: resources, plan, per-actor throughput
    runs: tuple[ClusterBenchRun, ...]
    same_results: bool  # every image has the same detections on both paths

    def best(self) -> dict[str, ClusterBenchRun]:
        return best_rounds(self.runs)

    def ratios(self) -> dict[str, float]:
        """The cluster path over local infer: img/s (best rounds) and wall time (best rounds)."""
        best = self.best()
        if LOCAL not in best or CLUSTER not in best or not best[LOCAL].images_per_s or not best[LOCAL].wall_s:
            return {}
        return {"ray_over_local_images_per_s": best[CLUSTER].images_per_s / best[LOCAL].images_per_s,
                "ray_over_local_wall": best[CLUSTER].wall_s / best[LOCAL].wall_s}

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "model": self.model, "imgsz": self.imgsz, "batch": self.batch,
                "cluster": self.cluster, "same_results": self.same_results,
                "images_per_s": {m: round(r.images_per_s, 2) for m, r in self.best().items()},
                "ratios": {k: round(v, 3) for k, v in self.ratios().items()},
                "runs": [dataclasses.asdict(r) for r in self.runs]}

    def table(self) -> Table:
        plan = self.cluster.get("plan", {})
        table = Table(title=f"bench infer --cluster: {self.model}, {self.images} images, imgsz {self.imgsz}, batch "
                            f"{self.batch}; {plan.get('actors')} actor(s): {plan.get('reason')}", title_justify="left")
        for column in ("method", "img/s (best)", "wall s (best)", "rounds (img/s)"):
            table.add_column(column, justify="right")
        best = self.best()
        for method in (LOCAL, CLUSTER):
            if method in best:
                rounds = ", ".join(f"{r.images_per_s:.1f}" for r in self.runs if r.method == method)
                table.add_row(method, f"{best[method].images_per_s:.2f}", f"{best[method].wall_s:.2f}", rounds)
        for name, value in self.ratios().items():
            table.add_row(name.replace("_", " "), f"{value:.2f}x", "", "")
        table.add_row("same detections", "yes" if self.same_results else "NO", "", "")
        return table


def run_cluster_bench(config: InferConfig, cluster: ClusterConfig, repeats: int = 1) -> ClusterBenchReport:
    """Local ``infer`` and the cluster path, ``repeats`` rounds each, interleaved.

    Raises:
        InputError: as :func:`~.run.run_cluster_inference`; ``repeats`` < 1.
    """
    from yolo_batch.inference.cluster import ray_backend
    from yolo_batch.inference.cluster.run import run_cluster_inference

    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    runs: list[ClusterBenchRun] = []
    with tempfile.TemporaryDirectory(prefix="yolo-batch-bench-cluster-") as scratch, \
            ray_backend.connect(cluster):
        model = ultralytics_adapter.portable_model(config.model, Path(scratch))  # both paths: the same weights
        local_config = dataclasses.replace(config, model=str(model.path), out=Path(scratch) / "local", overwrite=True)
        ray_config = dataclasses.replace(local_config, out=Path(scratch) / "ray")
        for round_ in range(repeats):
            local = run_inference(local_config)
            runs.append(_run(LOCAL, round_, local))
            remote = run_cluster_inference(ray_config, cluster)
            runs.append(_run(CLUSTER, round_, remote))
        same = _detections(local_config.out) == _detections(ray_config.out)
    return ClusterBenchReport(images=local.images_total, model=config.model, imgsz=config.imgsz,
                              batch=str(config.batch), cluster=remote.cluster or {}, runs=tuple(runs),
                              same_results=same)


def _run(method: str, round_: int, summary: InferenceSummary) -> ClusterBenchRun:
    return ClusterBenchRun(method, round_, summary.processed, round(summary.images_per_s, 2), round(summary.wall_s, 3))


def _detections(out: Path) -> dict[str, Any]:
    return {record["path"]: record["detections"] for record in journal_records(out)}
