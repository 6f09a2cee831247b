"""Batch profiles: the settings one kind of user needs, packaged under a name.

Built-ins (:data:`BUILTIN`): ``default`` (yolo-batch's plain defaults), ``medical`` (very large images,
1-2 per device, gradient accumulation to the nominal batch, BatchNorm policy, no colour jitter) and
``inspection`` (the largest batch memory allows, linear lr scaling with warmup, large FP16 inference
batches). A user profile is a YAML file in the format :func:`profile_to_yaml` writes; settings it
leaves out take the ``default`` profile's values.

Options given explicitly on the command line override a profile: :func:`train_config` takes ``None``
for "not given" and fills those from the profile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from yolo_batch.core.checks import (
    check_count,
    check_imgsz,
    check_latency_limit,
    check_optional_count,
    check_window,
)
from yolo_batch.errors import InputError
from yolo_batch.training.config import (
    RESERVED_TRAIN_ARGS,
    BatchRequest,
    BnPolicy,
    LrScaling,
    Rounding,
    SizingConfig,
    TrainConfig,
)


@dataclass(frozen=True)
class InferSettings:
    """What ``yolo-batch infer`` uses under this profile."""

    batch: int | str = 16  # an integer >= 1, or "auto" (throughput measured at growing sizes)
    half: bool | None = None  # None: FP16 on a GPU, FP32 on CPU
    max_latency_ms: float | None = None  # per batch, for batch "auto"

    def __post_init__(self) -> None:
        if isinstance(self.batch, str):
            if self.batch != "auto":
                raise InputError(f"infer.batch must be 'auto' or an integer >= 1, got '{self.batch}'")
        elif isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise InputError(f"infer.batch must be 'auto' or an integer >= 1, got {self.batch!r}")
        if self.half is not None and not isinstance(self.half, bool):
            raise InputError(f"infer.half must be true, false or null, got {self.half!r}")
        check_latency_limit(self.max_latency_ms, self.batch == "auto", name="infer.max_latency_ms",
                            batch_name="infer.batch")


@dataclass(frozen=True)
class Profile:
    """A named set of training and inference settings. Validated on construction (:class:`InputError`)."""

    name: str
    description: str = ""
    imgsz: int = 640
    fallback_batch: int = 16  # per device, where GPU memory cannot be measured
    max_batch: int | None = None  # AutoBatch cap per device; None: no cap
    rounding: Rounding = Rounding.POW2
    nominal_batch: int = 64
    lr_scaling: LrScaling = LrScaling.AUTO
    bn: BnPolicy = BnPolicy.AUTO
    rect: bool | None = False  # None: auto, rectangular batches where the training images are not square
    train_args: Mapping[str, Any] = field(default_factory=dict)  # Ultralytics train arguments (augmentation, ...)
    image_window: tuple[float, float] | None = None  # 16-bit/float images; None: each image's own min-max
    infer: InferSettings = field(default_factory=InferSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise InputError(f"description must be a string, got {self.description!r}")
        check_imgsz(self.imgsz, "train.imgsz")
        for key in ("fallback_batch", "nominal_batch"):
            check_count(getattr(self, key), f"train.{key}")
        check_optional_count(self.max_batch, "train.max_batch")
        for key, kind in (("rounding", Rounding), ("lr_scaling", LrScaling), ("bn", BnPolicy)):
            object.__setattr__(self, key, _enum(key, kind, getattr(self, key)))
        if self.rect is not None and not isinstance(self.rect, bool):
            raise InputError(f"train.rect must be true, false or auto, got {self.rect!r}")
        if not isinstance(self.train_args, Mapping) or not all(isinstance(k, str) for k in self.train_args):
            raise InputError(f"train.args must be a mapping of Ultralytics train arguments, got {self.train_args!r}")
        reserved = sorted(k for k in self.train_args if k in RESERVED_TRAIN_ARGS or k == "rect")  # rect: train.rect
        if reserved:
            raise InputError(f"train.args may not set {', '.join(reserved)}: "
                             "use the profile's own settings or the command-line options")
        object.__setattr__(self, "train_args", MappingProxyType(dict(self.train_args)))
        if self.image_window is not None:
            if not isinstance(self.image_window, (list, tuple)) or not all(map(_is_number, self.image_window)):
                raise InputError(f"train.image_window must be null or [low, high], got {self.image_window!r}")
            try:
                object.__setattr__(self, "image_window", check_window(self.image_window))
            except ValueError as exc:
                raise InputError(f"train.image_window: {exc}") from None
        if not isinstance(self.infer, InferSettings):
            raise InputError(f"infer must be a mapping, got {self.infer!r}")

    def settings(self) -> dict[str, str]:
        """Every setting as ``section.key -> text``, in the YAML's order (for tables)."""
        rows: dict[str, str] = {}
        for key, value in _as_dict(self)["train"].items():
            if key == "args":
                rows.update({f"train.args.{k}": _text(v) for k, v in value.items()})
            else:
                rows[f"train.{key}"] = _text(value)
        rows.update({f"infer.{k}": _text(v) for k, v in _as_dict(self)["infer"].items()})
        return rows


def _enum(key: str, kind: type[Enum], value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InputError(f"train.{key} must be one of {allowed}, got {value!r}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


BUILTIN: Mapping[str, Profile] = MappingProxyType({
    "default": Profile(
        name="default",
        description="yolo-batch's defaults: AutoBatch on a GPU (16 where memory cannot be measured), "
                    "powers of two, nominal batch 64",
    ),
    "medical": Profile(
        name="medical",
        description="very large scans: 1-2 images per device at imgsz 1024, gradients accumulated to the "
                    "nominal batch, BatchNorm frozen when fine-tuning at such batches, no colour jitter or "
                    "mosaic, rectangular batches for non-square images; inference one image at a time",
        imgsz=1024,
        fallback_batch=2,
        max_batch=2,
        rect=None,
        train_args={"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "mosaic": 0.0},
        infer=InferSettings(batch=1),
    ),
    "inspection": Profile(
        name="inspection",
        description="the largest batch memory allows (multiples of 8), lr0 scaled linearly with warmup when "
                    "the effective batch exceeds the nominal; inference in large FP16 batches sized by "
                    "throughput",
        rounding=Rounding.MULT8,
        lr_scaling=LrScaling.LINEAR,
        train_args={"warmup_epochs": 3.0},
        infer=InferSettings(batch="auto", half=True),
    ),
})

_SECTIONS = {"name", "description", "train", "infer"}
_TRAIN_KEYS = {"imgsz": "imgsz", "fallback_batch": "fallback_batch", "max_batch": "max_batch",
               "rounding": "rounding", "nominal_batch": "nominal_batch", "lr_scaling": "lr_scaling", "bn": "bn",
               "rect": "rect", "image_window": "image_window", "args": "train_args"}
_INFER_KEYS = {f.name for f in dataclasses.fields(InferSettings)}


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name, or a user profile from a YAML file.

    Raises:
        InputError: an unknown name, a missing or malformed file, unknown keys, wrong types or values
            (one line, naming the file and the setting).
    """
    text = str(name_or_path)
    if text in BUILTIN:
        return BUILTIN[text]
    path = Path(text)
    if path.suffix.lower() not in {".yaml", ".yml"} and not path.is_file():
        raise InputError(f"unknown profile '{text}': built-in profiles are {', '.join(sorted(BUILTIN))}, "
                         "or pass a profile .yaml file")
    try:
        content = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"profile file not found: {text}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read profile {text}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or "not YAML"
        raise InputError(f"malformed profile {text}{line}: {problem}") from None
    try:
        profile = profile_from_dict(content, default_name=path.stem)
        if profile.train_args:
            from yolo_batch.ultralytics_adapter import validate_train_args

            validate_train_args(profile.train_args)
    except InputError as exc:
        raise InputError(f"profile {text}: {exc}") from None
    return profile


def profile_from_dict(content: Any, default_name: str = "custom") -> Profile:
    """Build a profile from the YAML's mapping; settings left out take the ``default`` profile's values.

    Raises:
        InputError: unknown keys, wrong types or values.
    """
    if not isinstance(content, Mapping):
        raise InputError("expected a mapping with name, description, train and infer")
    _check_keys("", content, _SECTIONS)
    train = content.get("train") or {}
    infer = content.get("infer") or {}
    if not isinstance(train, Mapping) or not isinstance(infer, Mapping):
        raise InputError("train and infer must be mappings")
    _check_keys("train.", train, set(_TRAIN_KEYS))
    _check_keys("infer.", infer, _INFER_KEYS)
    values: dict[str, Any] = {_TRAIN_KEYS[k]: v for k, v in train.items()}
    if values.get("rect") == "auto":
        values["rect"] = None
    if "train_args" in values and values["train_args"] is None:
        values["train_args"] = {}
    base = BUILTIN["default"]
    return dataclasses.replace(
        base,
        name=content.get("name", default_name),
        description=content.get("description", ""),
        **values,
        infer=dataclasses.replace(base.infer, **infer),
    )


def _check_keys(prefix: str, mapping: Mapping[Any, Any], allowed: set[str]) -> None:
    unknown = [str(k) for k in mapping if k not in allowed]
    if unknown:
        raise InputError(f"unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _as_dict(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "description": profile.description,
        "train": {
            "imgsz": profile.imgsz,
            "fallback_batch": profile.fallback_batch,
            "max_batch": profile.max_batch,
            "rounding": profile.rounding.value,
            "nominal_batch": profile.nominal_batch,
            "lr_scaling": profile.lr_scaling.value,
            "bn": profile.bn.value,
            "rect": "auto" if profile.rect is None else profile.rect,
            "image_window": list(profile.image_window) if profile.image_window is not None else None,
            "args": dict(profile.train_args),
        },
        "infer": dataclasses.asdict(profile.infer),
    }


_YAML_HEADER = """\
# yolo-batch profile. Edit it and pass it back: yolo-batch train --profile this.yaml ...
# Options given on the command line override these settings; settings left out take the 'default' profile's.
# train: imgsz, fallback_batch (per device where GPU memory cannot be measured), max_batch (AutoBatch cap per
#   device, null = none), rounding (pow2|mult8|none), nominal_batch (gradients accumulate to it), lr_scaling
#   (auto|linear|sqrt|none), bn (auto|train|freeze|sync), rect (true|false|auto: when images are not square),
#   image_window ([low, high] for 16-bit/float images, null = each image's own min-max),
#   args (any Ultralytics train argument: augmentation, warmup, ...)
# infer: batch (integer or auto), half (true|false|null = FP16 on GPU), max_latency_ms (with batch auto)
"""


def profile_to_yaml(profile: Profile) -> str:
    """The profile as YAML that :func:`load_profile` reads back to an equal profile."""
    return _YAML_HEADER + yaml.safe_dump(_as_dict(profile), sort_keys=False, default_flow_style=False, width=100)


def train_config(
    profile: Profile,
    *,
    model: str,
    data: Path | None,
    batch: BatchRequest,
    epochs: int,
    device: str | None = None,
    use_cache: bool = True,
    imgsz: int | None = None,
    rounding: Rounding | str | None = None,
    nominal_batch: int | None = None,
    lr_scaling: LrScaling | str | None = None,
    bn: BnPolicy | str | None = None,
    extra: Mapping[str, Any] | None = None,
    project: str | None = None,
    name: str | None = None,
) -> TrainConfig:
    """The one merge of a profile with the options given explicitly (``None``: not given, the profile decides).

    ``extra`` (``--set``) wins over the profile's ``train_args``; a ``--set rect=...`` wins over the profile's
    ``rect``, whose ``auto`` is decided when training starts, from the dataset's images.

    Raises:
        InputError: bad values.
    """
    explicit = dict(extra or {})

    def pick(given: Any, default: Any) -> Any:
        return default if given is None else given

    sizing = SizingConfig(
        model=model, data=data, device=device, batch=batch, epochs=epochs, use_cache=use_cache,
        imgsz=pick(imgsz, profile.imgsz),
        rounding=Rounding(pick(rounding, profile.rounding)),
        nominal_batch=pick(nominal_batch, profile.nominal_batch),
        lr_scaling=LrScaling(pick(lr_scaling, profile.lr_scaling)),
        bn=BnPolicy(pick(bn, profile.bn)),
        fallback_batch=profile.fallback_batch,
        max_batch=profile.max_batch,
        profile=profile.name,
    )
    return TrainConfig(sizing=sizing, project=project, name=name, extra={**profile.train_args, **explicit},
                       image_window=profile.image_window, rect=profile.rect)


def infer_settings(profile: Profile, *, batch: str | int | None, half: bool | None,
                   max_latency_ms: float | None) -> dict[str, Any]:
    """``infer``'s batch, half and latency limit: options given explicitly (not None) over the profile's.

    A batch given explicitly also drops the profile's latency limit, which only applies to its 'auto'.
    """
    latency = max_latency_ms
    if latency is None and batch is None:
        latency = profile.infer.max_latency_ms
    return {
        "batch": str(batch) if batch is not None else str(profile.infer.batch),
        "half": half if half is not None else profile.infer.half,
        "max_latency_ms": latency,
    }
