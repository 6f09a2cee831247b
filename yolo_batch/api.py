"""The Python entry points: one function per command, keyword arguments named as the command's options.

Each builds the same typed config as the command line (a profile merged under the options given, validated on
construction) and calls the same library function, so a script and ``yolo-batch`` cannot drift apart::

    import yolo_batch

    result = yolo_batch.train(data="bccd/data.yaml", epochs=50, imgsz=640)        # yolo-batch train
    decision = yolo_batch.autobatch(data="bccd/data.yaml", batch=0.8)             # yolo-batch autobatch
    summary = yolo_batch.infer("images/", model=result.weights, out="out", batch="auto")   # yolo-batch infer
    for detections in yolo_batch.iter_detections("images/", model=result.weights):        # results as values
        print(detections.path, detections.xyxy, detections.class_id)
    report = yolo_batch.sweep(data="bccd/data.yaml", batches="8,16,32", epochs=3)   # yolo-batch sweep
    advice = yolo_batch.advise(data="bccd/data.yaml")                               # yolo-batch advise

Nothing here prints unless asked: ``progress=True`` reports long steps on stderr as the commands do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.core.progress import ConsoleReporter, Reporter
from yolo_batch.errors import InputError
from yolo_batch.training.config import BatchRequest, SizingConfig, TrainConfig

if TYPE_CHECKING:
    from yolo_batch.inference.cluster.plan import ClusterConfig
    from yolo_batch.inference.config import InferConfig
    from yolo_batch.inference.detections import Detections
    from yolo_batch.inference.summary import InferenceSummary
    from yolo_batch.training.advise import Advice
    from yolo_batch.training.decision import AutoBatchDecision
    from yolo_batch.training.run import TrainResult
    from yolo_batch.training.sweep_report import SweepReport

Source = str | Path
Sources = Source | Sequence[Source]


def build_train_config(
    *, model: str | Path = DEFAULT_MODEL, data: str | Path | None = None, profile: str | Path | None = None,
    imgsz: int | None = None, device: str | int | None = None, batch: float | str | None = None,
    rounding: str | None = None, nominal_batch: int | None = None, lr_scaling: str | None = None,
    bn: str | None = None, epochs: int = 100, cache: bool = True, extra: Mapping[str, Any] | None = None,
    project: str | None = None, name: str | None = None,
) -> TrainConfig:
    """The :class:`TrainConfig` ``yolo-batch train`` builds from the same options (``None``: the profile decides).

    ``batch``: ``None``, ``-1`` or ``"auto"`` (AutoBatch), a fraction such as ``0.7`` (AutoBatch at 70 % of free
    memory) or a fixed total batch such as ``32``.

    Raises:
        InputError: a bad value, an unknown profile, or a profile file that does not parse.
    """
    from yolo_batch.profiles import load_profile, train_config

    return train_config(
        load_profile(profile or "default"), model=str(model), data=Path(data) if data is not None else None,
        device=str(device) if device is not None else None, batch=_batch_request(batch), epochs=epochs,
        use_cache=cache, imgsz=imgsz, rounding=rounding, nominal_batch=nominal_batch, lr_scaling=lr_scaling, bn=bn,
        extra=extra, project=project, name=name,
    )


def train(
    config: TrainConfig | None = None, *, model: str | Path = DEFAULT_MODEL, data: str | Path | None = None,
    profile: str | Path | None = None, imgsz: int | None = None, device: str | int | None = None,
    batch: float | str | None = None, rounding: str | None = None, nominal_batch: int | None = None,
    lr_scaling: str | None = None, bn: str | None = None, epochs: int = 100, cache: bool = True,
    extra: Mapping[str, Any] | None = None, project: str | None = None, name: str | None = None,
    progress: bool | Reporter = False, on_decision: Callable[[AutoBatchDecision], None] | None = None,
) -> TrainResult:
    """Train with an AutoBatch decision: ``yolo-batch train`` as a function.

    ``autobatch.json`` (and ``autobatch.png`` when GPU memory was measured) is written into the run folder before
    the first epoch. Pass either the options (as the command's, ``extra`` for ``--set``) or a ready ``config``.

    Example::

        result = yolo_batch.train(data="bccd/data.yaml", model="yolo11s.yaml", imgsz=640, epochs=50,
                                  extra={"cos_lr": True})
        print(result.decision.batch, result.weights, result.map50)

    Raises:
        InputError: bad model, data, device, batch or pass-through argument (nothing is written).
    """
    from yolo_batch.training.run import train as run_training

    if config is None:
        config = build_train_config(model=model, data=data, profile=profile, imgsz=imgsz, device=device, batch=batch,
                                    rounding=rounding, nominal_batch=nominal_batch, lr_scaling=lr_scaling, bn=bn,
                                    epochs=epochs, cache=cache, extra=extra, project=project, name=name)
    return run_training(config, on_decision=on_decision, progress=_reporter(progress))


def autobatch(
    config: SizingConfig | TrainConfig | None = None, *, model: str | Path = DEFAULT_MODEL,
    data: str | Path | None = None, profile: str | Path | None = None, imgsz: int | None = None,
    device: str | int | None = None, batch: float | str | None = None, rounding: str | None = None,
    nominal_batch: int | None = None, lr_scaling: str | None = None, bn: str | None = None, epochs: int = 100,
    cache: bool = True, extra: Mapping[str, Any] | None = None, progress: bool | Reporter = False,
) -> AutoBatchDecision:
    """The training batch only, no training: ``yolo-batch autobatch`` as a function.

    Example::

        decision = yolo_batch.autobatch(data="bccd/data.yaml", imgsz=640, batch=0.8, device=0)
        print(decision.batch, decision.accumulate, decision.reasons)
        decision.save("autobatch.json")
        yolo_batch.save_autobatch_plot(decision, "autobatch.png")   # when GPU memory was measured

    Raises:
        InputError: bad model, data, device or option.
        BudgetTooSmall: not even batch 1 fits the GPU memory budget.
    """
    from yolo_batch.training.autobatch import estimate_batch
    from yolo_batch.training.run import split_train_args

    if config is None:
        config = build_train_config(model=model, data=data, profile=profile, imgsz=imgsz, device=device, batch=batch,
                                    rounding=rounding, nominal_batch=nominal_batch, lr_scaling=lr_scaling, bn=bn,
                                    epochs=epochs, cache=cache, extra=extra)
    if isinstance(config, TrainConfig):
        sizing, _ = split_train_args(config.sizing, config.extra)
    else:
        sizing = config
    return estimate_batch(sizing, progress=_reporter(progress))


def build_infer_config(source: Sources, *, model: str | Path = DEFAULT_MODEL, profile: str | Path | None = None,
                       batch: int | str | None = None, half: bool | None = None,
                       max_latency_ms: float | None = None, **settings: Any) -> InferConfig:
    """The :class:`InferConfig` ``yolo-batch infer`` builds: the profile's batch, FP16, latency limit and image
    window under the options given; ``settings`` are any other :class:`InferConfig` field (``imgsz``, ``device``,
    ``conf``, ``iou``, ``max_det``, ``classes``, ``workers``, ``threads``, ``streams``, ``out``, ``formats``,
    ``save_annotated``, ``overwrite``, ...), so a field added there is accepted here too.

    Raises:
        InputError: an unknown setting or a bad value.
    """
    from yolo_batch.inference.config import BatchSetting, InferConfig
    from yolo_batch.profiles import infer_settings, load_profile

    known = {f.name for f in dataclasses.fields(InferConfig)} - {"sources", "model", "batch", "half",
                                                                  "max_latency_ms"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown inference setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    chosen = load_profile(profile or "default")
    merged = infer_settings(chosen, batch=batch, half=half, max_latency_ms=max_latency_ms)
    settings.setdefault("image_window", chosen.image_window)
    if settings.get("out") is not None:
        settings["out"] = Path(settings["out"])
    sources = (source,) if isinstance(source, (str, Path)) else tuple(source)
    return InferConfig(sources=tuple(str(s) for s in sources), model=str(model),
                       batch=BatchSetting.parse(merged["batch"]), half=merged["half"],
                       max_latency_ms=merged["max_latency_ms"], **settings)


def infer(source: Sources, *, model: str | Path = DEFAULT_MODEL, profile: str | Path | None = None,
          batch: int | str | None = None, out: str | Path = "runs/infer", progress: bool | Reporter = False,
          cluster: str | None = None, actors: int | None = None, gpus_per_actor: float | None = None,
          **settings: Any) -> InferenceSummary:
    """Detect objects in ``source`` and write the results into ``out``: ``yolo-batch infer`` as a function.

    ``source``: a folder (recursive), a glob, a text file listing images, an image, or a list of those.
    ``settings``: the command's other options by their :class:`InferConfig` names (``imgsz``, ``device``,
    ``half``, ``conf``, ``iou``, ``max_det``, ``classes``, ``workers``, ``threads``, ``streams``, ``formats``,
    ``save_annotated``, ``max_latency_ms``, ``overwrite``). Resumable: a second call with the same ``out``
    processes only what is missing. With ``batch="auto"`` the measurements are in ``out/throughput.png``.
    ``cluster="ray"`` (or ``"ray:ADDRESS"``) runs on a Ray cluster (``actors``, ``gpus_per_actor`` as the
    command's ``--actors``, ``--gpus-per-actor``), writing the same files; a driver already connected with
    ``ray.init`` is used as it is.

    Example::

        summary = yolo_batch.infer("images/", model="best.pt", out="out", batch="auto", save_annotated=True)
        print(summary.processed, summary.images_per_s, summary.exit_code)
        summary = yolo_batch.infer("s3-mount/archive/", model="best.pt", out="out", cluster="ray")

    Raises:
        InputError: bad sources, model, device, setting, or an ``out`` holding another configuration's results.
    """
    from yolo_batch.inference.runner import run_inference

    clustered = build_cluster_config(cluster, actors, gpus_per_actor)
    config = build_infer_config(source, model=model, profile=profile, batch=batch, out=out, **settings)
    reporter = _reporter(progress)
    task = reporter.task("infer", failures=True) if reporter is not None else None
    if clustered is not None:
        from yolo_batch.inference.cluster.run import run_cluster_inference

        return run_cluster_inference(config, clustered, progress=task,
                                     on_note=reporter.note if reporter is not None else None)
    return run_inference(config, progress=task)


def build_cluster_config(cluster: str | None, actors: int | None = None,
                         gpus_per_actor: float | None = None) -> ClusterConfig | None:
    """The :class:`ClusterConfig` ``--cluster`` builds (None without a cluster, whose settings are then refused).

    Raises:
        InputError: a bad cluster name or count, or actors / GPUs per actor without a cluster.
    """
    from yolo_batch.inference.cluster.plan import ClusterConfig

    if cluster is None:
        if actors is not None or gpus_per_actor is not None:
            raise InputError("actors and gpus-per-actor need a cluster (--cluster ray)")
        return None
    return ClusterConfig.parse(cluster, actors=actors, gpus_per_actor=gpus_per_actor)


def iter_detections(source: Sources, *, model: str | Path = DEFAULT_MODEL, profile: str | Path | None = None,
                    batch: int | str | None = None, out: str | Path | None = None, cluster: str | None = None,
                    actors: int | None = None, gpus_per_actor: float | None = None,
                    **settings: Any) -> Generator[Detections, None, None]:
    """One :class:`Detections` per image, in completion order, from ``infer``'s pipeline (buckets, batch or
    ``"auto"``, out-of-memory splitting); nothing is written unless ``out`` is given.

    ``settings`` are those of :func:`infer`. The generator holds a bounded number of images however many there
    are; stopping early (``break``, ``close()``) stops the pipeline and its threads. An image that cannot be read
    yields a value with ``error`` set and no boxes. With ``out``, it writes what ``infer`` writes and skips the
    images ``out`` already holds (resume). Settings are checked at the call; sources, model and device at the first
    ``next()``. ``cluster="ray"`` (with ``actors``, ``gpus_per_actor``) runs on a Ray cluster as :func:`infer` does,
    handing over each block's results as it reaches the driver.

    Example::

        import supervision as sv

        boxes = sv.BoxAnnotator()
        for detections in yolo_batch.iter_detections("images/", model="best.pt", batch=16, conf=0.4):
            if not detections.ok:
                print(detections.path, detections.error)
                continue
            keep = detections[detections.confidence > 0.5]
            print(detections.path, len(keep), keep.class_name)
            frame = boxes.annotate(cv2.imread(detections.path), keep.to_supervision())

    Raises:
        InputError: an unknown setting or a bad value.
    """
    from yolo_batch.inference.stream import iter_inference

    if out is None and (settings.get("save_annotated") or settings.get("formats") or settings.get("overwrite")):
        raise InputError("save_annotated, formats and overwrite are about output files: give out= as well")
    if out is not None:
        settings["out"] = out
    clustered = build_cluster_config(cluster, actors, gpus_per_actor)
    config = build_infer_config(source, model=model, profile=profile, batch=batch, **settings)
    if clustered is not None:
        from yolo_batch.inference.cluster.run import iter_cluster_inference

        return iter_cluster_inference(config, clustered, write_files=out is not None)
    return iter_inference(config, write_files=out is not None)


def sweep(
    *, model: str | Path = DEFAULT_MODEL, data: str | Path | None = None, batches: str | Sequence[int] = "auto",
    epochs: int = 10, profile: str | Path | None = None, imgsz: int | None = None, device: str | int | None = None,
    nominal_batch: int | None = None, lr_scaling: str | None = None, seed: int = 0, out: str | Path = "runs/sweep",
    extra: Mapping[str, Any] | None = None, progress: bool | Reporter = False,
) -> SweepReport:
    """Train the same run at several batches and compare them: ``yolo-batch sweep`` as a function.

    ``batches``: ``"auto"``, ``"8,32,128"`` or a sequence of ints. Resumable: a second call with the same ``out``
    trains only the runs that did not finish.

    Example::

        report = yolo_batch.sweep(data="bccd/data.yaml", batches=[8, 16, 32], epochs=3, imgsz=160, device="cpu")
        print(report.recommendation, report.gap_note)

    Raises:
        InputError: a bad batch list or option, or an ``out`` holding runs made under other settings.
    """
    from yolo_batch.training.sweep import SweepConfig, parse_batches, run_sweep

    text = batches if isinstance(batches, str) else ",".join(str(b) for b in batches)
    parsed = parse_batches(text)
    base = build_train_config(model=model, data=data, profile=profile, imgsz=imgsz, device=device, epochs=epochs,
                              nominal_batch=nominal_batch, lr_scaling=lr_scaling, extra=extra)
    config = SweepConfig(base=base, batches=parsed, out=Path(out), seed=seed)
    return run_sweep(config, progress=_reporter(progress))


def advise(
    *, model: str | Path = DEFAULT_MODEL, data: str | Path | None = None, profile: str | Path | None = None,
    imgsz: int | None = None, device: str | int | None = None, batch: float | str | None = None, epochs: int = 100,
    nominal_batch: int | None = None, lr_scaling: str | None = None, small_batch: int = 4, chunks: int = 8,
    steps: int = 30, extra: Mapping[str, Any] | None = None, progress: bool | Reporter = False,
) -> Advice:
    """Batch, accumulation and lr0 from the gradient noise scale and the memory limit: ``yolo-batch advise``.

    The model is only read (gradients are taken on a copy). ``batch``: -1 or a memory fraction for the limit.

    Example::

        advice = yolo_batch.advise(data="bccd/data.yaml", model="runs/detect/train/weights/last.pt", imgsz=640)
        print(advice.noise_scale.b_simple, advice.noise_scale.ci95, advice.summary())

    Raises:
        InputError: a bad model, data, device or setting, or too few training images for one step.
    """
    from yolo_batch.training.advise import advise as run_advise
    from yolo_batch.training.noise_scale import NoiseSettings

    config = build_train_config(model=model, data=data, profile=profile, imgsz=imgsz, device=device, batch=batch,
                                epochs=epochs, nominal_batch=nominal_batch, lr_scaling=lr_scaling, extra=extra)
    noise = NoiseSettings(small_batch=small_batch, chunks=chunks, steps=steps)
    return run_advise(config.sizing, noise, progress=_reporter(progress))


def _batch_request(batch: float | str | None) -> BatchRequest:
    if batch is None or (isinstance(batch, str) and batch.strip().lower() == "auto"):
        return BatchRequest()
    if isinstance(batch, bool):
        raise InputError(f"batch must be -1, 'auto', a fraction in (0, 1] or an integer >= 1, got {batch}")
    return BatchRequest.parse(batch)


def _reporter(progress: bool | Reporter) -> Reporter | None:
    if progress is True:
        return ConsoleReporter()
    if progress is False:
        return None
    return progress
