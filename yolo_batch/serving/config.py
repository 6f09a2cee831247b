"""What ``yolo-batch serve`` was asked to do: one frozen, validated :class:`ServeConfig`.

Each setting is declared once, as a field of :class:`ServeConfig` with its help text (:func:`setting`). From
that declaration come the environment variable (``YOLO_BATCH_<NAME>``, for the container), its parser, the
command-line option and the default shown in ``--help`` (:data:`SETTINGS`; the CLI builds its options from it).
:func:`resolve` is the one merge: explicit options over environment over the profile's ``infer`` section over
the defaults here.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_batch.core.checks import (
    check_class_ids,
    check_count,
    check_imgsz,
    check_imgsz_bound,
    check_latency_limit,
    check_number,
    check_parallelism,
    check_unit_interval,
    parse_class_ids,
)
from yolo_batch.errors import InputError
from yolo_batch.inference.config import BatchSetting
from yolo_batch.inference.runtimes.choice import check_names

ENV_PREFIX = "YOLO_BATCH_"
TOKEN_ENV = "YOLO_BATCH_TOKEN"
LOG_LEVELS = ("debug", "info", "warning", "error")


def setting(default: Any, help: str, *, shown: str | None = None) -> Any:
    """A :class:`ServeConfig` field that is also a setting (option and environment variable).

    Args:
        default: the value when nothing sets it.
        help: what it means, one sentence.
        shown: the default as ``--help`` states it, where the value alone would mislead (None: "decided
            elsewhere").
    """
    return field(default=default, metadata={"help": help, "shown": shown})


@dataclass(frozen=True)
class ServeConfig:
    """One ``yolo-batch serve`` process. Validated on construction (:class:`InputError` for bad values)."""

    model: str = setting("", "A local .pt file or an Ultralytics yaml name (required).", shown="none")
    host: str = setting("127.0.0.1", "Address to bind (127.0.0.1: this machine only; 0.0.0.0 in the container).")
    port: int = setting(8000, "Port (0: any free port).")
    max_batch: BatchSetting = setting(BatchSetting(), "Images per forward pass: N or 'auto' (measured).",
                                      shown="the profile's (16)")
    max_delay_ms: float = setting(5.0, "Longest wait of the oldest queued image for its batch to fill.")
    queue_size: int = setting(1024, "Images accepted and not yet answered; beyond it 429.")
    timeout_ms: float = setting(2000.0, "Per request, from arrival to answer; beyond it 504.")
    workers: int | None = setting(None, "Decode threads.", shown="as infer: cores-1 on a GPU, cores/4 on CPU")
    threads: int | None = setting(None, "Torch threads per inference stream.", shown="1 on CPU")
    streams: int | None = setting(None, "Batches run side by side.", shown="one per core on CPU, 1 on a GPU")
    profile: str = setting("default", "default, medical, inspection or a profile .yaml (its infer section).")
    imgsz: int = setting(640, "Long side after letterboxing.")
    device: str | None = setting(None, "'cpu' or one GPU such as '0'.", shown="GPU 0 if present")
    half: bool | None = setting(None, "Older switch: false means precision fp32.", shown="auto")
    backend: str = setting("auto", "auto, torch, openvino, onnxruntime or tensorrt (the same choice as infer).",
                           shown="auto: the fastest runtime installed")
    precision: str = setting("auto", "auto, fp32, fp16 or bf16.", shown="auto: fp16 on a GPU, bf16 on a CPU that "
                                                                       "has it, else fp32")
    cache: bool = setting(True, "Reuse a cached export of the model (--no-cache exports again).")
    conf: float = setting(0.25, "Confidence threshold.")
    iou: float = setting(0.7, "NMS IoU threshold.")
    max_det: int = setting(300, "Most detections per image.")
    classes: tuple[int, ...] | None = setting(None, "Keep only these class ids: '0,2' or repeated.", shown="all")
    max_latency_ms: float | None = setting(None, "Per-batch latency limit for --max-batch auto.", shown="none")
    max_body_bytes: int = setting(64 << 20, "Largest request body (all its images together); beyond it 413.")
    max_image_bytes: int = setting(32 << 20, "Largest encoded image; beyond it 413.")
    # 100 megapixels: a line-scan frame still fits
    max_pixels: int = setting(100_000_000, "Largest decoded image (width x height); beyond it 413.")
    max_images: int = setting(64, "Most images in one request; beyond it 413.")
    read_timeout_s: float = setting(30.0, "Longest time to receive one request's body; beyond it 408 (a slow or "
                                          "stalled upload no longer holds its connection).")
    # an open file each: well under the usual 1024 open files per process
    max_connections: int = setting(512, "Most open connections; beyond them a new request gets 503 and is closed.")
    watch: Path | None = setting(None, "Hot folder: process files that appear in it (with --out).", shown="none")
    out: Path | None = setting(None, "Where the hot folder's results.jsonl and errors.jsonl go.", shown="none")
    poll_ms: float = setting(250.0, "Hot folder scan interval.")
    settle_ms: float = setting(1000.0, "Hot folder: a file is taken once its size and modification time held this "
                                       "long (and at least one scan).")
    corrupt_retry_s: float = setting(5.0, "Hot folder: a file that does not decode (truncated, empty) is taken once "
                                          "more after this wait, in case its writer was not done; then failed/.")
    grace_s: float = setting(30.0, "On SIGTERM, time for queued work to finish; the rest gets 503.")
    log_level: str = setting("info", "debug, info, warning or error.")
    image_window: tuple[float, float] | None = None  # the profile's, for 16-bit images
    token: str | None = field(default=None, repr=False)  # bearer token; None: no authentication

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InputError("no model: pass --model (a .pt file or an Ultralytics yaml) or set YOLO_BATCH_MODEL")
        if not isinstance(self.max_batch, BatchSetting):
            object.__setattr__(self, "max_batch", BatchSetting.parse(self.max_batch))
        for name in ("watch", "out"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "classes", check_class_ids(self.classes))
        self._check_limits()

    def _check_limits(self) -> None:
        if not self.host.strip():
            raise InputError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise InputError(f"port must be in 0..65535, got {self.port}")
        check_number(self.max_delay_ms, "max-delay-ms", minimum=0.0)
        check_number(self.timeout_ms, "timeout-ms", positive=True)
        check_number(self.poll_ms, "poll-ms", positive=True)
        check_number(self.settle_ms, "settle-ms", minimum=0.0)
        check_number(self.corrupt_retry_s, "corrupt-retry-s", minimum=0.0)
        check_number(self.grace_s, "grace-s", minimum=0.0)
        check_number(self.read_timeout_s, "read-timeout-s", positive=True)
        check_latency_limit(self.max_latency_ms, self.max_batch.is_auto, batch_name="--max-batch")
        for name in ("queue_size", "max_det", "max_body_bytes", "max_image_bytes", "max_pixels", "max_images",
                     "max_connections"):
            check_count(getattr(self, name), name.replace("_", "-"))
        for name in ("workers", "threads", "streams"):
            check_parallelism(getattr(self, name), name)  # the same caps as infer
        check_imgsz_bound(check_imgsz(self.imgsz))
        check_unit_interval(self.conf, "conf")
        check_unit_interval(self.iou, "iou")
        if (self.watch is None) != (self.out is None):
            raise InputError("--watch and --out go together: the hot folder and where its results go")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise InputError("the token must be non-empty and without whitespace")
        check_names(self.backend, self.precision)
        if self.log_level.lower() not in LOG_LEVELS:
            raise InputError(f"log level must be debug, info, warning or error, got '{self.log_level}'")

    def to_dict(self) -> dict[str, Any]:
        """Every setting (the token as a flag only), for /v1/info and logs."""
        out: dict[str, Any] = {s.name: _plain(getattr(self, s.name)) for s in SETTINGS if s.name != "token_file"}
        out["auth"] = self.token is not None
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, (BatchSetting, Path)):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# --- the settings, derived from the fields -----------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


@dataclass(frozen=True)
class Setting:
    """One setting: its name, environment variable, parser, meaning and default as ``--help`` states it."""

    name: str
    parse: Callable[[str], Any]
    help: str
    default: Any = None
    shown: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        return self.shown if self.shown is not None else str(_plain(self.default))

    def help_text(self) -> str:
        """The help with its default and environment variable, as ``--help`` shows it."""
        return f"{self.help} Default: {self.default_text}. [env {self.env}]"


_PARSERS: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str, Path: Path, bool: parse_bool,
                                             BatchSetting: str, tuple: parse_class_ids}


def _parser(annotation: Any) -> Callable[[str], Any]:
    """The environment parser for a field's type (``X | None`` parses as ``X``)."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = typing.get_origin(options[0]) or options[0]
    return _PARSERS[kind]


def _settings() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(ServeConfig)
    declared = tuple(Setting(f.name, _parser(hints[f.name]), f.metadata["help"], f.default, f.metadata["shown"])
                     for f in dataclasses.fields(ServeConfig) if "help" in f.metadata)
    token_file = Setting("token_file", Path, f"File holding the bearer token (or set {TOKEN_ENV}); then every route "
                                             "but /healthz needs 'Authorization: Bearer <token>'.", shown="none")
    return (*declared, token_file)


SETTINGS: tuple[Setting, ...] = _settings()
_BY_NAME = {s.name: s for s in SETTINGS}


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given as ``YOLO_BATCH_*`` environment variables, parsed (empty values count as unset).

    Raises:
        InputError: a value that does not parse, naming the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in SETTINGS:
        text = environ.get(item.env, "").strip()
        if not text:
            continue
        try:
            values[item.name] = item.parse(text)
        except ValueError as exc:
            raise InputError(f"{item.env}={text!r}: {exc}") from None
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


# Values that example files and tutorials put where a token goes; a service guarded by one of them is open.
PLACEHOLDER_TOKENS = frozenset({
    "change-me", "changeme", "change_me", "change-this", "replace-me", "replaceme", "your-token",
    "your-token-here", "yourtoken", "token", "secret", "password", "placeholder", "example", "xxx", "todo",
    "<token>", "<your-token>",
})


def refuse_placeholder_token(token: str, source: str) -> None:
    """Reject a token that is an obvious placeholder (the example env file's ``change-me``, ``secret``, ...).

    Raises:
        InputError: naming ``source`` (where the token came from) and how to make a real one.
    """
    if token.strip().lower() in PLACEHOLDER_TOKENS:
        raise InputError(f"{source} is the placeholder '{token}', not a token: set a real one, e.g. the output of "
                         "python3 -c \"import secrets; print(secrets.token_urlsafe(32))\"")


def resolve(explicit: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServeConfig:
    """The one merge: ``explicit`` (options given on the command line; ``None`` values count as not given)
    over the environment over the profile's ``infer`` section over the defaults.

    The token comes from ``token_file`` (option, then ``YOLO_BATCH_TOKEN_FILE``) or ``YOLO_BATCH_TOKEN``.

    Raises:
        InputError: unknown setting names, bad values, an unreadable profile or token file, a placeholder token.
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
    if token is not None:
        refuse_placeholder_token(token, f"the token file {token_file}" if token_file is not None else TOKEN_ENV)
    merged.pop("token_file", None)
    merged.update(profile=str(merged.get("profile", "default")), max_batch=BatchSetting.parse(settings["batch"]),
                  half=settings["half"], max_latency_ms=settings["max_latency_ms"], image_window=profile.image_window,
                  token=token)
    if "model" not in merged:
        raise InputError("no model: pass --model (a .pt file or an Ultralytics yaml) or set YOLO_BATCH_MODEL")
    return ServeConfig(**merged)
