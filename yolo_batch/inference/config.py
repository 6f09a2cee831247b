"""What an inference run was asked to do: one frozen, validated :class:`InferConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from yolo_batch.core.checks import (
    check_class_ids,
    check_count,
    check_imgsz,
    check_imgsz_bound,
    check_latency_limit,
    check_parallelism,
    check_unit_interval,
)
from yolo_batch.core.models import DEFAULT_MODEL
from yolo_batch.errors import InputError
from yolo_batch.inference.runtimes.choice import check_names

DEFAULT_OUT = Path("runs/infer")
MAX_FILE_BYTES = 512 << 20  # a larger image file is treated as a mistake, not decoded
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit: a 3-channel decode would need ~0.5 GB


class OutputFormat(str, Enum):
    """Result files besides the journal (results.jsonl is always written: resume reads it)."""

    JSONL = "jsonl"
    CSV = "csv"
    YOLO_TXT = "yolo-txt"


def default_workers(cpu_count: int | None = None, on_gpu: bool = False) -> int:
    """Decode threads: on a GPU box every core but one decodes; on CPU the forward pass needs the cores,
    and decoding is a few per cent of its cost, so a quarter of them (at least one) keeps it ahead."""
    cores = cpu_count or os.cpu_count() or 1
    if on_gpu:
        return max(1, min(cores - 1, 16))
    return max(1, cores // 4)


@dataclass(frozen=True)
class BatchSetting:
    """``--batch``: a fixed size, or ``auto`` (throughput measured at growing sizes)."""

    fixed: int | None = 16  # None: auto

    def __post_init__(self) -> None:
        if self.fixed is not None and (isinstance(self.fixed, bool) or self.fixed < 1):
            raise InputError(f"batch must be 'auto' or an integer >= 1, got {self.fixed}")

    @property
    def is_auto(self) -> bool:
        return self.fixed is None

    @classmethod
    def parse(cls, value: str | int) -> BatchSetting:
        text = str(value).strip().lower()
        if text == "auto":
            return cls(fixed=None)
        if not text.lstrip("+").isdigit():
            raise InputError(f"batch must be 'auto' or an integer >= 1, got '{value}'")
        return cls(fixed=int(text))

    def __str__(self) -> str:
        return "auto" if self.fixed is None else str(self.fixed)


@dataclass(frozen=True)
class InferConfig:
    """One ``yolo-batch infer`` run. Validated on construction (:class:`InputError` for bad values)."""

    sources: tuple[str, ...]
    model: str = DEFAULT_MODEL
    out: Path = DEFAULT_OUT
    batch: BatchSetting = field(default_factory=BatchSetting)
    imgsz: int = 640
    device: str | None = None
    half: bool | None = None  # the older switch: False means precision fp32; True or None leave precision auto
    backend: str = "auto"  # auto, torch, openvino, onnxruntime, tensorrt
    precision: str = "auto"  # auto, fp32, fp16, bf16
    use_cache: bool = True  # reuse a cached export (False: --no-cache, export again)
    export_cache: Path | None = None  # where exports are cached; None: <yolo-batch cache>/exports
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    classes: tuple[int, ...] | None = None
    workers: int | None = None  # None: default_workers()
    threads: int | None = None  # torch threads per inference stream; None: 1 on CPU, torch's default on GPU
    streams: int | None = None  # parallel inference streams; None: one per core on CPU (/threads), 1 on GPU
    formats: tuple[OutputFormat, ...] = (OutputFormat.JSONL,)
    save_annotated: bool = False
    max_latency_ms: float | None = None  # per batch, for --batch auto
    image_window: tuple[float, float] | None = None  # 16-bit/float images (a profile's); None: own min..max
    overwrite: bool = False
    max_file_bytes: int = MAX_FILE_BYTES
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        object.__setattr__(self, "out", Path(self.out))
        if self.export_cache is not None:
            object.__setattr__(self, "export_cache", Path(self.export_cache))
        object.__setattr__(self, "formats", tuple(dict.fromkeys(OutputFormat(f) for f in self.formats)))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        if not self.sources:
            raise InputError("no SOURCE given: pass a folder, a glob or a text file listing image paths")
        check_imgsz_bound(check_imgsz(self.imgsz))
        check_unit_interval(self.conf, "conf")
        check_unit_interval(self.iou, "iou")
        check_count(self.max_det, "max-det")
        check_class_ids(self.classes)
        for name in ("workers", "threads", "streams"):
            check_parallelism(getattr(self, name), name)
        check_latency_limit(self.max_latency_ms, self.batch.is_auto)
        check_count(self.max_file_bytes, "max file bytes")
        check_count(self.max_pixels, "max pixels")
        check_names(self.backend, self.precision)

    def precision_request(self) -> str:
        """The precision to ask the runtime choice for: ``--precision``, else ``--no-half`` as fp32, else auto."""
        return requested_precision(self.precision, self.half)

    def result_settings(self, backend: str | None = None, precision: str | None = None) -> dict[str, Any]:
        """The settings that change what the results say: a resumed run must use the same ones (with the runtime
        and precision the run resolved, when given)."""
        runtime = {} if backend is None else {"backend": backend, "precision": precision}
        return {**runtime, "model": self.model, "imgsz": self.imgsz, "conf": self.conf, "iou": self.iou,
                "max_det": self.max_det, "classes": list(self.classes) if self.classes is not None else None,
                "image_window": list(self.image_window) if self.image_window is not None else None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources), "model": self.model, "out": str(self.out), "batch": str(self.batch),
            "imgsz": self.imgsz, "device": self.device, "half": self.half, "backend": self.backend,
            "precision": self.precision, "use_cache": self.use_cache, "conf": self.conf, "iou": self.iou,
            "max_det": self.max_det, "classes": list(self.classes) if self.classes is not None else None,
            "workers": self.workers, "threads": self.threads, "streams": self.streams,
            "formats": [f.value for f in self.formats],
            "save_annotated": self.save_annotated, "max_latency_ms": self.max_latency_ms, "overwrite": self.overwrite,
        }


def requested_precision(precision: str, half: bool | None) -> str:
    """``--precision`` wins; else ``--no-half`` (or a profile's ``half: false``) means fp32; else auto.

    ``half: true`` (the inspection profile) stays auto: fp16 on a GPU, and on a CPU whatever is fastest there
    instead of an error.
    """
    if precision != "auto":
        return precision
    return "fp32" if half is False else "auto"

