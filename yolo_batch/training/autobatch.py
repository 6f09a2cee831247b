"""AutoBatch: from a sizing request to a verified :class:`AutoBatchDecision`.

This module wires the parts together; it holds no arithmetic of its own. NVML (``nvml``), the
CUDA probe (``probe``) and Ultralytics (``ultralytics_adapter``) are adapters; the search
(``batch_search``), the curve (``memory_curve``) and the scaling (``scaling``) are pure.
``GpuBackend`` is the seam tests use to stand in fake GPUs with fake memory curves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from yolo_batch import __version__, ultralytics_adapter
from yolo_batch.core.devices import DeviceSelection, parse_device
from yolo_batch.core.models import model_fingerprint
from yolo_batch.core.nvml import CudaDevice, GpuMemory, NvmlUnavailable, read_gpus
from yolo_batch.core.progress import Reporter, tracked
from yolo_batch.errors import InputError, YoloBatchError
from yolo_batch.training.batchnorm import choose_bn_policy
from yolo_batch.training.budget import BudgetPlan, ddp_reserve_bytes, own_usage, plan_budgets, reconcile_free
from yolo_batch.training.cache import DecisionCache, cache_key
from yolo_batch.training.config import SizingConfig
from yolo_batch.training.data import (
    DatasetInfo,
    cache_dir,
    inspect_dataset,
    resolve_data,
)
from yolo_batch.training.decision import AutoBatchDecision, GpuBudget, ProbeSample, gib
from yolo_batch.training.scaling import plan_scaling
from yolo_batch.training.search import NoBatchFits, round_batch, search_batch
from yolo_batch.training.settings import MEMORY_ARGS, TrainerSettings, resolve_trainer_settings

log = logging.getLogger(__name__)

FIXED_REASON = "batch set by the user"


class BudgetTooSmall(YoloBatchError):
    """Not even batch 1 fits the memory budget."""


class Probe(Protocol):
    def measure(self, batch: int) -> ProbeSample: ...
    def close(self) -> None: ...


class GpuBackend(Protocol):
    """What AutoBatch needs from the accelerator runtime."""

    def device_count(self) -> int: ...
    def identify(self, indices: Sequence[int]) -> Sequence[CudaDevice]:
        """How CUDA names these devices (their UUIDs), without creating a context."""
    def init_context(self, index: int) -> int:
        """Create this process's context on GPU ``index``; return bytes the framework has reserved there."""
    def mem_get_info(self, index: int) -> tuple[int, int] | None:
        """(free, total) bytes as CUDA reports them on a GPU that already has our context; None if unknown."""
    def make_probe(self, model: Any, nc: int, setup: Any, index: int) -> Probe: ...


class TorchCudaBackend:
    """The real backend: torch CUDA and Ultralytics' DetectionModel."""

    def device_count(self) -> int:
        from yolo_batch.core.cuda import device_count

        return device_count()

    def identify(self, indices: Sequence[int]) -> Sequence[CudaDevice]:
        from yolo_batch.core.cuda import identify

        return identify(indices)

    def init_context(self, index: int) -> int:
        from yolo_batch.training.probe import cuda_context_bytes, device_for

        return cuda_context_bytes(device_for(index))

    def mem_get_info(self, index: int) -> tuple[int, int] | None:
        from yolo_batch.core.cuda import mem_get_info

        return mem_get_info(index)

    def make_probe(self, model: Any, nc: int, setup: Any, index: int) -> Probe:
        from yolo_batch.training.probe import TrainingProbe, device_for

        return TrainingProbe(ultralytics_adapter.detection_model(model, nc, {}), setup, device_for(index))


def estimate_batch(
    config: SizingConfig,
    *,
    backend: GpuBackend | None = None,
    nvml: ModuleType | None = None,
    cache: DecisionCache | None = None,
    model: Any | None = None,
    dataset: DatasetInfo | None = None,
    progress: Reporter | None = None,
) -> AutoBatchDecision:
    """Decide the training batch for ``config``: measured on the GPU, or a fallback with its reason.

    ``model`` and ``dataset``: the already loaded ``config.model`` (a YOLO object, only read here) and the
    already inspected ``config.data``, so a caller that trains next checks and loads each once. ``progress``:
    told about the label scan and each probe (which batch, how long, what it peaked at).

    Raises:
        InputError: bad model, data or device.
        BudgetTooSmall: batch 1 does not fit the memory budget.
    """
    backend = backend or TorchCudaBackend()
    info = dataset if dataset is not None else inspect_dataset(resolve_data(config.data), progress=progress)
    model = model if model is not None else ultralytics_adapter.load_model(config.model)
    devices = parse_device(config.device, backend.device_count())
    cache = cache or DecisionCache(cache_dir() / "autobatch")
    request = _Request(config, info, devices, start=time.perf_counter())  # timed after the inputs are checked

    fixed = config.batch.fixed
    if fixed is not None:
        if fixed % devices.world_size:
            raise InputError(f"batch {fixed} must be a multiple of the {devices.world_size} GPUs")
        return request.decide(fixed // devices.world_size, "fixed", reasons=(FIXED_REASON,))
    if devices.is_cpu:
        why = "no CUDA GPU found" if config.device is None else "device is CPU"
        return request.fall_back(f"{why}: AutoBatch sizes GPU memory, so {request.default_text} is used")
    reserve = ddp_reserve_bytes(ultralytics_adapter.parameter_count(model), devices.world_size)
    try:
        plan, gpus = read_budgets(backend, devices, config.batch.fraction, nvml=nvml, ddp_reserve=reserve)
    except (NvmlUnavailable, RuntimeError) as exc:  # RuntimeError: the CUDA runtime itself failed to start
        return request.fall_back(f"{exc}; using {request.default_text}")
    settings = trainer_settings(config, model, info, request.cap * devices.world_size)
    return _measure(request, plan, gpus[0].driver, settings, backend, cache, model, progress)


@dataclass(frozen=True)
class _Request:
    """One estimation: what was asked, what the data holds, which devices, and when it started."""

    config: SizingConfig
    info: DatasetInfo
    devices: DeviceSelection
    start: float

    @property
    def cap(self) -> int:
        """The largest per-device batch worth trying: the dataset's size, or a profile's cap (medical: 2)."""
        cap = max(self.info.train_images // self.devices.world_size, 1)
        return cap if self.config.max_batch is None else min(cap, self.config.max_batch)

    @property
    def fallback(self) -> int:
        return round_batch(min(self.config.fallback_batch, self.cap), self.config.rounding)

    @property
    def default_text(self) -> str:
        config = self.config
        if self.fallback == config.fallback_batch:
            return f"the default batch {self.fallback}"
        return (f"the default batch {self.fallback} (default {config.fallback_batch} rounded {config.rounding.value}, "
                f"at most {self.cap} per device for {self.info.train_images} training images)")

    def decide(self, batch: int, source: str, **kwargs: Any) -> AutoBatchDecision:
        return _decide(self.config, self.info, self.devices, batch, source, self.start, **kwargs)

    def fall_back(self, reason: str) -> AutoBatchDecision:
        return self.decide(self.fallback, "fallback", reasons=(reason,))


def _measure(request: _Request, plan: BudgetPlan, driver: str | None, settings: TrainerSettings,
             backend: GpuBackend, cache: DecisionCache, model: Any, progress: Reporter | None = None
             ) -> AutoBatchDecision:
    """Probe on the tightest GPU (or reuse a cached decision that still fits today's budget)."""
    config, info = request.config, request.info
    notes = list(plan.notes)
    tightest = next(b for b in plan.gpus if b.index == plan.probe_index)
    key = cache_key({
        "gpu": tightest.name, "total": tightest.total_bytes, "model": model_fingerprint(config.model),
        "nc": info.nc, "targets": info.worst_case_targets, "imgsz": config.imgsz, "amp": config.amp,
        "optimizer": config.optimizer, "fraction": config.batch.fraction, "rounding": config.rounding.value,
        "cap": request.cap, "world": request.devices.world_size, "yolo_batch": __version__,
        **ultralytics_adapter.versions(), "settings": settings.key(), "driver": driver, "mig": tightest.mig,
    })
    cached = cache.load(key) if config.use_cache else None
    if cached is not None and cached.verified_peak_bytes is not None:
        if cached.verified_peak_bytes <= tightest.budget_bytes:
            peak = cached.verified_peak_bytes / 2**30
            reasons = (*notes, f"cache hit: the verified peak {peak:.2f} GiB fits today's budget")
            return request.decide(cached.batch, "autobatch", reasons=reasons, gpus=plan.gpus, cached=cached,
                                  settings=settings, precision=cached.precision)
        notes.append("cached decision no longer fits: other processes now hold more memory; re-measuring")

    probe = backend.make_probe(model, info.nc, probe_setup(settings, info), tightest.index)
    if progress is not None:
        progress.note(f"autobatch: probing GPU {tightest.index} ({tightest.name}) with real training steps, "
                      f"budget {gib(tightest.budget_bytes)}")
    try:
        result = search_batch(reported(probe.measure, progress), tightest.budget_bytes, request.cap, config.rounding)
    except NoBatchFits as exc:
        raise BudgetTooSmall(
            f"GPU {tightest.index} ({tightest.name}): {exc}; free memory, lower --imgsz or use a smaller model"
        ) from None
    finally:
        probe.close()
    precision = getattr(probe, "precision", None) or settings.precision
    if precision != settings.precision:
        notes.append(f"Ultralytics' AMP check fails on this GPU: the trainer trains in {precision}, and the batch "
                     f"was sized for {precision}")
    decision = request.decide(result.batch, "autobatch", reasons=(*notes, *result.reasons), gpus=plan.gpus,
                              predicted=result.predicted_peak, verified=result.verified, probes=result.samples,
                              settings=settings, precision=precision)
    cache.store(key, decision)
    return decision


def reported(measure: Callable[[int], ProbeSample], progress: Reporter | None) -> Callable[[int], ProbeSample]:
    """``measure`` that shows which batch is being probed while it runs, and a line with its outcome after."""
    if progress is None:
        return measure

    def run(batch: int) -> ProbeSample:
        with tracked(progress, f"autobatch: probing batch {batch}", total=None):
            sample = measure(batch)
        if sample.oom:
            outcome = "out of memory"
        else:
            val = f", validation at {sample.val_batch} {gib(sample.val_peak_bytes)}" if sample.val_batch else ""
            outcome = f"training peak {gib(sample.train_peak_bytes)}{val}"
        progress.note(f"autobatch: batch {batch}: {outcome} ({sample.seconds:.1f} s)")
        return sample

    return run


def read_budgets(backend: GpuBackend, devices: DeviceSelection, fraction: float, *, nvml: ModuleType | None = None,
                 ddp_reserve: int = 0, pid: int | None = None) -> tuple[BudgetPlan, list[GpuMemory]]:
    """Identify the chosen GPUs, create this process's context on the first, and plan each GPU's budget.

    NVML is read before and after the context exists (its size, where NVML hides per-process figures or lists
    host PIDs), and CUDA's own free memory is checked against NVML's.

    Raises:
        NvmlUnavailable: NVML cannot answer or cannot identify a GPU (the reason says which).
        RuntimeError: the CUDA runtime failed to start.
    """
    pid = os.getpid() if pid is None else pid
    cuda = backend.identify(devices.cuda)
    before = read_gpus(devices.cuda, nvml=nvml, cuda=cuda)
    reserved = backend.init_context(devices.cuda[0])
    after = read_gpus(devices.cuda, nvml=nvml, cuda=cuda)
    own = own_usage(before[0], after[0], reserved, pid)
    notes = [f"GPU {g.index} found in NVML by {g.matched_by} (CUDA reported no UUID)"
             for g in after if g.matched_by != "uuid"]
    notes += [f"GPU {g.index} is a MIG instance: its own {g.total_bytes / 2**30:.1f} GiB are budgeted"
              for g in after if g.mig]
    if own.pid is not None and own.pid != pid:
        notes.append(f"NVML lists this process as PID {own.pid} (host PIDs: a container); not counted as another "
                     "process")
    free: dict[int, int] = {}
    measured = backend.mem_get_info(devices.cuda[0])
    if measured is not None:
        free[after[0].index], why = reconcile_free(after[0], *measured)
        if why:
            notes.append(why)
    plan = plan_budgets(after, fraction, reserved=reserved, world_size=devices.world_size, own=own, pid=pid,
                        ddp_reserve=ddp_reserve, free_override=free)
    return dataclasses.replace(plan, notes=(*notes, *plan.notes)), after


def trainer_settings(config: SizingConfig, model: Any, info: DatasetInfo, max_total_batch: int) -> TrainerSettings:
    """The trainer's memory-relevant settings for this run, by Ultralytics' rules and defaults."""
    return resolve_trainer_settings(
        config.trainer_args, ultralytics_adapter.default_train_args(MEMORY_ARGS), imgsz=config.imgsz,
        amp=config.amp, optimizer=config.optimizer, device_type="cuda", stride=ultralytics_adapter.model_stride(model),
        n_train=info.train_images, nominal_batch=config.nominal_batch, epochs=config.epochs, nc=info.nc,
        max_total_batch=max_total_batch,
    )


def probe_setup(settings: TrainerSettings, info: DatasetInfo) -> Any:
    """The probe's setup: the trainer's settings and the data's worst case."""
    from yolo_batch.training.probe import ProbeSetup

    return ProbeSetup(imgsz=settings.imgsz, targets_per_image=info.worst_case_targets, nc=info.nc,
                      precision=settings.precision, amp_check=settings.amp_check,
                      channels_last=settings.channels_last, deterministic=settings.deterministic, seed=settings.seed,
                      freeze=settings.freeze, optimizer=settings.optimizer, val_images=info.val_images or None)


def _decide(
    config: SizingConfig,
    info: DatasetInfo,
    devices: DeviceSelection,
    batch: int,
    source: str,
    start: float,
    *,
    reasons: Sequence[str] = (),
    gpus: Sequence[GpuBudget] = (),
    predicted: float | None = None,
    verified: ProbeSample | None = None,
    probes: Sequence[ProbeSample] = (),
    cached: AutoBatchDecision | None = None,
    settings: TrainerSettings | None = None,
    precision: str | None = None,
) -> AutoBatchDecision:
    scale = plan_scaling(
        batch=batch, world_size=devices.world_size, nominal_batch=config.nominal_batch, optimizer=config.optimizer,
        lr0=config.lr0, momentum=config.momentum, rule=config.lr_scaling, n_train=info.train_images,
        epochs=config.epochs, nc=info.nc, accumulate_to=config.accumulate_to,
    )
    notes = [*info.notes, *reasons, *(settings.reasons if settings is not None else ())]
    if source != "fixed" and config.max_batch is not None:
        notes.append(f"capped at {config.max_batch} per device by the {config.profile} profile")
    bn = choose_bn_policy(config.bn, batch, devices.world_size, config.starts_from_weights)
    if bn.warning is not None:
        log.warning(bn.warning)
        notes.append(bn.warning)
    decision = AutoBatchDecision(
        source=source, batch=batch, world_size=devices.world_size, total_batch=scale.total_batch,
        accumulate=scale.accumulate, effective_batch=scale.effective_batch, nominal_batch=config.nominal_batch,
        optimizer=scale.optimizer, lr0_before=scale.lr0_before, lr0_after=scale.lr0_after, lr_rule=scale.lr_rule,
        lr_factor=scale.lr_factor, step_factor=scale.step_factor, lr_optimizer=scale.lr_optimizer,
        device=str(devices), model=config.model, imgsz=config.imgsz,
        amp=config.amp if precision is None else precision != "fp32", precision=precision,
        probe_settings=settings.key() if settings is not None else {},
        rounding=config.rounding.value, fraction=config.batch.fraction if config.batch.is_auto else None,
        profile=config.profile, bn_policy=bn.policy.value, bn_reason=bn.reason,
        dataset_size=info.train_images, max_objects=info.max_objects, gpus=tuple(gpus),
        budget_bytes=min((g.budget_bytes for g in gpus), default=None),
        predicted_peak_bytes=int(predicted) if predicted is not None else None,
        verified_peak_bytes=verified.peak_bytes if verified is not None else None,
        probes=tuple(probes), pinned=scale.pinned, reasons=(*notes, *scale.reasons),
    )
    if cached is not None:
        decision = dataclasses.replace(
            decision, cache_hit=True, probes=cached.probes, predicted_peak_bytes=cached.predicted_peak_bytes,
            verified_peak_bytes=cached.verified_peak_bytes,
        )
    return dataclasses.replace(decision, seconds=time.perf_counter() - start)
