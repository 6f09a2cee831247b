"""``infer --cluster``: the same inference on a Ray cluster through Ray Data, with the same exactly-once results.

* :mod:`.plan`: ``--cluster`` parsed once and the actor pool from the cluster's resources (pure).
* :mod:`.work`: what runs on the workers (a decode task, the inference actor), with no Ray in it: the shared
  steps of :mod:`yolo_batch.inference.stages` applied to Ray Data's blocks.
* :mod:`.ray_backend`: the only module that imports Ray (on first use): connect, the dataset, the stream.
* :mod:`.run`: the driver: local ``infer``'s checks, journal (resume) and writers around the stream.
* :mod:`.bench`: ``bench infer --cluster``: the cluster path against local ``infer`` on the same images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from yolo_batch.core.lazy import lazy_exports

if TYPE_CHECKING:
    from yolo_batch.inference.cluster.bench import ClusterBenchReport, run_cluster_bench
    from yolo_batch.inference.cluster.plan import ClusterConfig, ClusterPlan, ClusterResources, plan_cluster
    from yolo_batch.inference.cluster.run import run_cluster_inference

__all__ = [
    "ClusterBenchReport",
    "ClusterConfig",
    "ClusterPlan",
    "ClusterResources",
    "plan_cluster",
    "run_cluster_bench",
    "run_cluster_inference",
]

__getattr__, __dir__ = lazy_exports(__name__)
