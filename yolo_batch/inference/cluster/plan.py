"""Where the cluster path runs and with how many actors: ``--cluster`` parsed once, and the actor plan (pure).

:func:`plan_cluster` takes plain numbers (what the cluster holds, what was asked) and returns a
:class:`ClusterPlan` that says why; it never talks to Ray, so it is tested with plain values.

* GPUs per actor: ``--gpus-per-actor``, else 1 where the cluster has a GPU (and ``--device cpu`` was not given),
  else 0: CPU actors.
* Actors: ``--actors``, else one per GPU share; on CPUs three quarters of the cores (at least one), the last
  quarter decoding, as local ``infer`` splits a CPU box (decoding is a few per cent of a CPU forward pass).
* At least one CPU stays free for the decode tasks: an actor holds its CPUs for the whole run, so a pool that
  takes every CPU would leave the decode tasks waiting for ever.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from yolo_batch.core.checks import check_optional_count
from yolo_batch.errors import InputError

ENGINES = ("ray",)
EXTRA = "ray"  # pip install 'yolo-batch[ray]'
DECODE_ROWS = 16  # images per decode task: small blocks spread over the CPUs and reach the driver sooner


@dataclass(frozen=True)
class ClusterConfig:
    """``--cluster ray[:ADDRESS]`` with ``--actors`` and ``--gpus-per-actor``; validated on construction."""

    engine: str = "ray"
    address: str | None = None  # None: RAY_ADDRESS when set, else a local cluster
    actors: int | None = None
    gpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"--cluster must be 'ray' or 'ray:ADDRESS', got '{self.engine}'")
        check_optional_count(self.actors, "actors")
        if self.gpus_per_actor is not None and (isinstance(self.gpus_per_actor, bool) or self.gpus_per_actor < 0):
            raise InputError(f"gpus-per-actor must be >= 0, got {self.gpus_per_actor}")

    @classmethod
    def parse(cls, text: str, actors: int | None = None, gpus_per_actor: float | None = None) -> ClusterConfig:
        """``ray`` or ``ray:ADDRESS`` (``ray:auto``, ``ray:10.0.0.5:6379``, ``ray:ray://head:10001``)."""
        engine, sep, address = str(text).strip().partition(":")
        if sep and not address.strip():
            raise InputError(f"--cluster {text}: give an address after 'ray:', or 'ray' alone")
        return cls(engine=engine.lower(), address=address.strip() or None, actors=actors,
                   gpus_per_actor=gpus_per_actor)

    def describe(self) -> str:
        return f"{self.engine} at {self.address}" if self.address else f"{self.engine} (RAY_ADDRESS or a local cluster)"

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "address": self.address, "actors": self.actors,
                "gpus_per_actor": self.gpus_per_actor}


@dataclass(frozen=True)
class ClusterResources:
    """What the cluster holds, summed over its live nodes."""

    nodes: int
    cpus: float
    gpus: float

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "cpus": self.cpus, "gpus": self.gpus}


@dataclass(frozen=True)
class ClusterPlan:
    """The actor pool and how work is cut: what the run asks Ray for, and why."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    rows_per_call: int  # images an actor receives per call (its batch, or the most --batch auto may pick)
    rows_per_task: int  # images per decode task
    reason: str

    @property
    def device(self) -> str:
        """The device each actor runs on: the GPU Ray assigned it (CUDA numbers it 0), or the CPU."""
        return "0" if self.gpus_per_actor > 0 else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {"actors": self.actors, "cpus_per_actor": self.cpus_per_actor, "gpus_per_actor": self.gpus_per_actor,
                "device": self.device, "rows_per_call": self.rows_per_call, "rows_per_task": self.rows_per_task,
                "reason": self.reason}


def check_cluster_settings(device: str | None, workers: int | None = None, streams: int | None = None) -> None:
    """Local ``infer``'s placement settings on a cluster: ``--device cpu`` (CPU actors) only, since a GPU is Ray's
    to assign; no ``--workers``/``--streams``, since decode tasks take the free CPUs and each actor is one stream.

    Raises:
        InputError: a setting the cluster path would otherwise ignore.
    """
    if device is not None and device.strip().lower() != "cpu":
        raise InputError(f"--device {device} with --cluster: Ray assigns each actor its GPU; use --gpus-per-actor "
                         f"(or --device cpu for CPU actors)")
    if workers is not None or streams is not None:
        raise InputError("--workers and --streams are local infer's: with --cluster decode tasks take the free CPUs "
                         "and each actor runs one stream (use --actors; --threads sets a CPU actor's cores)")


def plan_cluster(resources: ClusterResources, cluster: ClusterConfig, device: str | None, threads: int | None,
                 batch: int | None, auto_max_batch: Mapping[str, int]) -> ClusterPlan:
    """The actor pool for ``resources`` (see the module docstring for the rules).

    Args:
        device: ``--device`` (None or ``cpu``).
        threads: torch threads per CPU actor (``--threads``; the CPUs each CPU actor asks for).
        batch: the fixed batch, or None for ``--batch auto``.
        auto_max_batch: the largest batch ``--batch auto`` explores, by device type ("cuda", "cpu").

    Raises:
        InputError: a pool the cluster cannot hold.
    """
    check_cluster_settings(device)
    if device is not None and cluster.gpus_per_actor:
        raise InputError(f"--device cpu and --gpus-per-actor {cluster.gpus_per_actor:g} contradict each other")
    if device is not None:
        gpus = 0.0
    elif cluster.gpus_per_actor is not None:
        gpus = float(cluster.gpus_per_actor)
    else:
        gpus = 1.0 if resources.gpus >= 1 else 0.0
    if gpus > 0:
        actors, cpus, reason = _gpu_pool(resources, cluster, gpus)
    else:
        actors, cpus, reason = _cpu_pool(resources, cluster, threads or 1)
    rows = batch or auto_max_batch["cuda" if gpus > 0 else "cpu"]
    return ClusterPlan(actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus, rows_per_call=rows,
                       rows_per_task=max(1, min(rows, DECODE_ROWS)), reason=reason)


def _gpu_pool(resources: ClusterResources, cluster: ClusterConfig, gpus: float) -> tuple[int, float, str]:
    fit = int(resources.gpus // gpus + 1e-9)
    if fit < 1:
        raise InputError(f"--gpus-per-actor {gpus:g}, but the cluster has {resources.gpus:g} GPU(s)")
    actors = cluster.actors or fit
    if actors > fit:
        raise InputError(f"--actors {actors} x {gpus:g} GPU needs {actors * gpus:g} GPUs; the cluster has "
                         f"{resources.gpus:g}")
    _check_decode_cpus(resources, actors, 1.0)
    reason = "--actors" if cluster.actors else f"one actor per {gpus:g} GPU ({resources.gpus:g} GPU(s))"
    return actors, 1.0, f"{reason}; {resources.cpus - actors:g} CPU(s) left to decode"


def _cpu_pool(resources: ClusterResources, cluster: ClusterConfig, threads: int) -> tuple[int, float, str]:
    fit = int(resources.cpus // threads)
    actors = cluster.actors or max(1, fit * 3 // 4)
    _check_decode_cpus(resources, actors, float(threads))
    reason = "--actors" if cluster.actors else f"3/4 of {resources.cpus:g} CPU(s) infer, at {threads} thread(s) each"
    return actors, float(threads), f"{reason}; {resources.cpus - actors * threads:g} CPU(s) left to decode"


def _check_decode_cpus(resources: ClusterResources, actors: int, cpus_per_actor: float) -> None:
    if resources.cpus - actors * cpus_per_actor < 1:
        raise InputError(f"{actors} actor(s) x {cpus_per_actor:g} CPU leave no CPU for decoding on a cluster of "
                         f"{resources.cpus:g} CPU(s): use fewer --actors")
