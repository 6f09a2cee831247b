"""What ``yolo-batch serve`` was asked to do: one frozen, validated :class:`ServeConfig`.

Every setting has a command-line option and an environment variable (``YOLO_BATCH_*``, listed in
:data:`SETTINGS`), for the container. :func:`resolve` is the one merge: explicit options over environment
over the profile's ``infer`` section over the defaults here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_batch.errors import InputError
from yolo_batch.inference.config import BatchSetting, parse_class_ids

ENV_PREFIX = "YOLO_BATCH_"
TOKEN_ENV = "YOLO_BATCH_TOKEN"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 64 << 20  # one request, all its images together
MAX_IMAGE_BYTES = 32 << 20  # one encoded image
MAX_PIXELS = 100_000_000  # one decoded image (a 100-megapixel line-scan frame still fits)
MAX_IMAGES = 64  # images in one request


@dataclass(frozen=True)
class ServeConfig:
    """One ``yolo-batch serve`` process. Validated on construction (:class:`InputError` for bad values)."""

    model: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    max_batch: BatchSetting = field(default_factory=BatchSetting)  # images per forward pass, or auto
    max_delay_ms: float = 5.0  # the oldest queued image waits at most this long for a batch to fill
    queue_size: int = 1024  # images accepted and not yet answered; beyond it 429
    timeout_ms: float = 2000.0  # per request, from arrival to answer; beyond it 504
    workers: int | None = None  # decode threads; None: as infer
    threads: int | None = None  # torch threads per inference stream; None: as infer
    streams: int | None = None  # batches run side by side; None: one per core on CPU, 1 on a GPU
    profile: str = "default"
    imgsz: int = 640
    device: str | None = None
    half: bool | None = None
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    classes: tuple[int, ...] | None = None
    max_latency_ms: float | None = None  # per batch, for max_batch auto
    image_window: tuple[float, float] | None = None  # the profile's, for 16-bit images
    token: str | None = field(default=None, repr=False)  # bearer token; None: no authentication
    max_body_bytes: int = MAX_BODY_BYTES
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_PIXELS
    max_images: int = MAX_IMAGES
    watch: Path | None = None  # hot folder
    out: Path | None = None  # results of the hot folder
    poll_ms: float = 250.0  # hot folder scan interval; a file is taken once its size held for one interval
    grace_s: float = 30.0  # SIGTERM: queued work finishes within this, the rest gets 503
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InputError("no model: pass --model (a .pt file or an Ultralytics yaml) or set YOLO_BATCH_MODEL")
        if not isinstance(self.max_batch, BatchSetting):
            object.__setattr__(self, "max_batch", BatchSetting.parse(self.max_batch))
        for name in ("watch", "out"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        if not self.host.strip():
            raise InputError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise InputError(f"port must be in 0..65535, got {self.port}")
        _check_number("max-delay-ms", self.max_delay_ms, minimum=0.0)
        _check_number("timeout-ms", self.timeout_ms)
        _check_number("poll-ms", self.poll_ms)
        _check_number("grace-s", self.grace_s, minimum=0.0)
        if self.max_latency_ms is not None:
            _check_number("max-latency-ms", self.max_latency_ms)
            if not self.max_batch.is_auto:
                raise InputError("--max-latency-ms applies to --max-batch auto only")
        for name in ("queue_size", "max_det", "max_body_bytes", "max_image_bytes", "max_pixels", "max_images"):
            _check_count(name, getattr(self, name))
        for name in ("workers", "threads", "streams"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        if self.imgsz < 32 or self.imgsz % 32:
            raise InputError(f"imgsz must be a multiple of 32 and at least 32, got {self.imgsz}")
        for name in ("conf", "iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {value}")
        if self.classes is not None and any(c < 0 for c in self.classes):
            raise InputError(f"classes must be class ids >= 0, got {list(self.classes)}")
        if (self.watch is None) != (self.out is None):
            raise InputError("--watch and --out go together: the hot folder and where its results go")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise InputError("the token must be non-empty and without whitespace")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise InputError(f"log level must be debug, info, warning or error, got '{self.log_level}'")

    def to_dict(self) -> dict[str, Any]:
        """Every setting (the token as a flag only), for /v1/info and logs."""
        return {
            "model": self.model, "host": self.host, "port": self.port, "max_batch": str(self.max_batch),
            "max_delay_ms": self.max_delay_ms, "queue_size": self.queue_size, "timeout_ms": self.timeout_ms,
            "workers": self.workers, "threads": self.threads, "streams": self.streams, "profile": self.profile,
            "imgsz": self.imgsz, "device": self.device, "half": self.half, "conf": self.conf, "iou": self.iou,
            "max_det": self.max_det, "classes": list(self.classes) if self.classes is not None else None,
            "max_latency_ms": self.max_latency_ms, "auth": self.token is not None,
            "max_body_bytes": self.max_body_bytes, "max_image_bytes": self.max_image_bytes,
            "max_pixels": self.max_pixels, "max_images": self.max_images,
            "watch": str(self.watch) if self.watch else None, "out": str(self.out) if self.out else None,
            "poll_ms": self.poll_ms, "grace_s": self.grace_s,
        }


def _check_number(name: str, value: float, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if minimum is None and value <= 0:
        raise InputError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum:g}, got {value}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


# --- the environment ---------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


@dataclass(frozen=True)
class Setting:
    """One setting: its :class:`ServeConfig` field, environment variable, parser and meaning (for docs)."""

    name: str
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("model", str, "model: a local .pt file or an Ultralytics yaml name (required)"),
    Setting("host", str, "address to bind (default 127.0.0.1; 0.0.0.0 in the container)"),
    Setting("port", int, "port (default 8000)"),
    Setting("max_batch", str, "images per forward pass: N or auto (default: the profile's, 16)"),
    Setting("max_delay_ms", float, "longest wait of the oldest queued image for its batch to fill (default 5)"),
    Setting("queue_size", int, "images accepted and not yet answered; beyond it 429 (default 1024)"),
    Setting("timeout_ms", float, "per request, from arrival to answer; beyond it 504 (default 2000)"),
    Setting("workers", int, "decode threads (default as infer: cores-1 on a GPU, cores/4 on CPU)"),
    Setting("threads", int, "torch threads per inference stream (default 1 on CPU)"),
    Setting("streams", int, "batches run side by side (default one per core on CPU, 1 on a GPU)"),
    Setting("profile", str, "default, medical, inspection or a profile .yaml (its infer section)"),
    Setting("imgsz", int, "long side after letterboxing (default 640)"),
    Setting("device", str, "cpu or one GPU such as 0 (default GPU 0 if present)"),
    Setting("half", _bool, "FP16: true or false (default: on a GPU)"),
    Setting("conf", float, "confidence threshold (default 0.25)"),
    Setting("iou", float, "NMS IoU threshold (default 0.7)"),
    Setting("max_det", int, "most detections per image (default 300)"),
    Setting("classes", parse_class_ids, "keep only these class ids, e.g. 0,2"),
    Setting("max_latency_ms", float, "per-batch latency limit for max_batch auto"),
    Setting("max_body_bytes", int, f"largest request body; beyond it 413 (default {MAX_BODY_BYTES})"),
    Setting("max_image_bytes", int, f"largest encoded image; beyond it 413 (default {MAX_IMAGE_BYTES})"),
    Setting("max_pixels", int, f"largest decoded image in pixels; beyond it 413 (default {MAX_PIXELS})"),
    Setting("max_images", int, f"most images in one request; beyond it 413 (default {MAX_IMAGES})"),
    Setting("watch", Path, "hot folder to process (with out)"),
    Setting("out", Path, "where the hot folder's results.jsonl and errors.jsonl go"),
    Setting("poll_ms", float, "hot folder scan interval (default 250)"),
    Setting("grace_s", float, "on SIGTERM, time for queued work to finish (default 30)"),
    Setting("log_level", str, "debug, info, warning or error (default info)"),
    Setting("token_file", Path, f"file holding the bearer token (instead of {TOKEN_ENV})"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given as ``YOLO_BATCH_*`` environment variables, parsed (empty values count as unset).

    Raises:
        InputError: a value that does not parse, naming the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = environ.get(setting.env, "").strip()
        if not text:
            continue
        try:
            values[setting.name] = setting.parse(text)
        except ValueError as exc:
            raise InputError(f"{setting.env}={text!r}: {exc}") from None
    return values


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace and a trailing newline removed).

    Raises:
        InputError: missing, unreadable or empty file.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise InputError(f"the token file {path} is empty")
    return token


def resolve(explicit: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServeConfig:
    """The one merge: ``explicit`` (options given on the command line; ``None`` values count as not given)
    over the environment over the profile's ``infer`` section over the defaults.

    The token comes from ``token_file`` (option, then ``YOLO_BATCH_TOKEN_FILE``) or ``YOLO_BATCH_TOKEN``.

    Raises:
        InputError: unknown setting names, bad values, an unreadable profile or token file.
    """
    from yolo_batch.profiles import infer_settings, load_profile

    environ = os.environ if environ is None else environ
    given = {k: v for k, v in explicit.items() if v is not None}
    unknown = sorted(set(given) - set(_BY_NAME))
    if unknown:
        raise InputError(f"unknown serve setting(s): {', '.join(unknown)}")
    env = from_env(environ)
    merged = {**env, **given}
    profile = load_profile(merged.get("profile", "default"))
    settings = infer_settings(profile, batch=merged.get("max_batch"), half=merged.get("half"),
                              max_latency_ms=merged.get("max_latency_ms"))
    token_file = given.get("token_file") or (None if environ.get(TOKEN_ENV, "").strip() else env.get("token_file"))
    token = read_token(token_file) if token_file is not None else (environ.get(TOKEN_ENV, "").strip() or None)
    merged.pop("token_file", None)
    merged.update(profile=str(merged.get("profile", "default")), max_batch=BatchSetting.parse(settings["batch"]),
                  half=settings["half"], max_latency_ms=settings["max_latency_ms"], image_window=profile.image_window,
                  token=token)
    if "model" not in merged:
        raise InputError("no model: pass --model (a .pt file or an Ultralytics yaml) or set YOLO_BATCH_MODEL")
    return ServeConfig(**merged)
