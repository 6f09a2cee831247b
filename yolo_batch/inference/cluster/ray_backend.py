"""The one module that imports Ray (lazily, on first use): connect, read the cluster, run the dataset.

The run is Ray Data's documented batch-inference pattern::

    from_items(paths) -> map_batches(prepare_block)            CPU tasks: decode + letterbox (PrepareStep)
                      -> map_batches(RayInferWorker, ActorPoolStrategy(size=actors), num_gpus=...)
                                                                 one engine per actor (InferStep)
                      -> iter_batches()                          on the driver, block by block as they complete

The two map stages are given different fault-tolerance arguments (``max_retries`` for the tasks,
``max_restarts``/``max_task_retries`` for the actors), which also keeps Ray Data from fusing them into one actor
stage: decoding stays in tasks on any free CPU while the actors run forward passes. A killed actor is restarted
and the blocks it held run again; the driver drops a result it already wrote, so none is written twice.

Workers must import ``yolo_batch`` (the same version as the driver): the decode function, the actor class and
the spec's dataclasses are pickled by reference. A local cluster started here runs its workers with the driver's
interpreter and the environment it had at ``ray.init`` (checked: a worker imports the same ``yolo_batch`` file,
an editable install included, and sees a variable the driver set before connecting), so nothing more is needed;
on a remote cluster install yolo-batch on every node, as for any library a Ray job uses (a node without it is
reported in one line by the first task, the runtime choice).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from yolo_batch.errors import InputError
from yolo_batch.inference.cluster.plan import EXTRA, ClusterConfig, ClusterPlan, ClusterResources
from yolo_batch.inference.cluster.work import (
    Block,
    InferWorker,
    WorkSpec,
    model_file,
    prepare_block,
    resolve_runtime_here,
)
from yolo_batch.inference.runtimes.choice import RuntimeChoice

log = logging.getLogger(__name__)
USAGE_STATS = "RAY_USAGE_STATS_ENABLED"  # Ray's documented opt-out

TASK_RETRIES = 3  # a decode task lost with its worker or node runs again
ACTOR_RESTARTS = 3  # a killed actor comes back (its blocks run again), up to three times each
CONNECT_TIMEOUT_S = 10.0


def import_ray() -> Any:
    """The ``ray`` module with Ray Data.

    Raises:
        InputError: Ray is not installed (one line naming the extra).
    """
    try:
        import ray
        import ray.data  # the cluster path is Ray Data's
    except ImportError:
        raise InputError(f"--cluster ray needs Ray Data, which is not installed: pip install 'yolo-batch[{EXTRA}]'"
                         ) from None
    return ray


class RayInferWorker(InferWorker):
    """:class:`InferWorker` taking the model's bytes from the object store (nodes need not share a filesystem)."""

    def __init__(self, spec: WorkSpec, model: Any) -> None:
        import ray

        data = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        super().__init__(spec, model_file(data, spec.model_sha256))


class RaySession:
    """A connected driver: the cluster's size, the runtime choice on a worker, and the run's stream of blocks."""

    def __init__(self, ray: Any, address: str) -> None:
        self.ray = ray
        self.address = address
        self.version = str(ray.__version__)

    def resources(self) -> ClusterResources:
        total = self.ray.cluster_resources()
        nodes = sum(1 for node in self.ray.nodes() if node.get("Alive"))
        return ClusterResources(nodes=nodes, cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)))

    def resolve_runtime(self, plan: ClusterPlan, backend: str, precision: str) -> RuntimeChoice:
        """The runtime choice made on a worker with an actor's resources (its runtimes and device).

        Raises:
            InputError: an explicit backend or precision that cannot run on the actors.
        """
        task = self.ray.remote(num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
                               max_retries=TASK_RETRIES)(resolve_runtime_here)
        try:
            choice: RuntimeChoice = self.ray.get(task.remote(backend, precision, plan.device))
            return choice
        except self.ray.exceptions.RayError as exc:
            cause = exc.as_instanceof_cause() if isinstance(exc, self.ray.exceptions.RayTaskError) else exc
            if isinstance(cause, InputError):
                raise InputError(str(cause).splitlines()[-1]) from None
            if "No module named 'yolo_batch'" in str(exc):  # the first task is where a node without it shows
                raise InputError("the cluster's workers cannot import yolo_batch: install yolo-batch (the driver's "
                                 "version) on every node") from None
            raise

    def blocks(self, paths: Sequence[str], spec: WorkSpec, plan: ClusterPlan, model: bytes) -> Iterator[Block]:
        """Run the dataset over ``paths``; yields the actors' output blocks as they complete."""
        data = self.ray.data
        context = data.DataContext.get_current()
        saved = context.enable_progress_bars, context.print_on_execution_start
        # The driver reports progress through its own reporter; the caller's settings come back after the run.
        context.enable_progress_bars, context.print_on_execution_start = False, False
        try:
            yield from self._dataset(paths, spec, plan, model).iter_batches(batch_size=None, batch_format="numpy")
        finally:
            context.enable_progress_bars, context.print_on_execution_start = saved

    def _dataset(self, paths: Sequence[str], spec: WorkSpec, plan: ClusterPlan, model: bytes) -> Any:
        data = self.ray.data
        model_ref = self.ray.put(model)
        dataset = data.from_items([{"path": p} for p in paths],
                                  override_num_blocks=max(1, -(-len(paths) // plan.rows_per_task)))
        with warnings.catch_warnings():
            # Fault-tolerance arguments go through map_batches' **ray_remote_args, Ray Data's documented way
            # (deprecated from 2.60 for 2.64, which the extra's upper bound keeps out).
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.map_batches(prepare_block, fn_kwargs={"spec": spec}, batch_size=plan.rows_per_task,
                                          batch_format="numpy", num_cpus=1, max_retries=TASK_RETRIES)
            dataset = dataset.map_batches(
                RayInferWorker, fn_constructor_kwargs={"spec": spec, "model": model_ref},
                batch_size=plan.rows_per_call, batch_format="numpy", compute=data.ActorPoolStrategy(size=plan.actors),
                num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor, max_restarts=ACTOR_RESTARTS,
                max_task_retries=ACTOR_RESTARTS)
        return dataset


@contextlib.contextmanager
def connect(cluster: ClusterConfig) -> Iterator[RaySession]:
    """Join the cluster ``cluster`` names (``ray``: RAY_ADDRESS, else a local one started here and stopped on
    exit); a driver already connected (``ray.init`` in the caller's script) is used as it is.

    Raises:
        InputError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    started = False
    # Ray's own start-up and execution lines: our reporter says what matters ("progress bars disabled": ours are on)
    quieter = {"ray": logging.WARNING, "ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    levels = {name: logging.getLogger(name).level for name in quieter}
    for name, level in quieter.items():
        logging.getLogger(name).setLevel(max(level, levels[name]))
    try:
        if not ray.is_initialized():
            _check_reachable(cluster)
            try:
                with _usage_stats_off():
                    ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False,
                             logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise InputError(f"cannot join the Ray cluster ({cluster.describe()}): {str(exc).splitlines()[0]}"
                                 ) from None
            started = True
        yield RaySession(ray, ray.get_runtime_context().gcs_address)
    finally:
        if started:
            ray.shutdown()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _usage_stats_off() -> Iterator[None]:
    """Ray reports usage statistics to its developers from a cluster it starts unless told not to, and yolo-batch
    never reaches the network on its own: off for ``ray.init`` (the processes it starts keep the setting), as it
    was after."""
    saved = os.environ.get(USAGE_STATS)
    os.environ[USAGE_STATS] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(USAGE_STATS, None)
        else:
            os.environ[USAGE_STATS] = saved


def _check_reachable(cluster: ClusterConfig, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """An address that names a host and port must answer a TCP connection: ``ray.init`` itself waits minutes for
    a cluster that is not there before it gives up.

    Raises:
        InputError: nothing answers at that address within ``timeout_s``.
    """
    address = cluster.address or ""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():  # "auto", or no address: Ray finds the local cluster or starts one
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise InputError(f"cannot join the Ray cluster ({cluster.describe()}): nothing answers at {host}:{port} "
                         f"({exc.strerror or exc})") from None
