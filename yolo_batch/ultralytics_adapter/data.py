"""Datasets and train arguments, read and checked by Ultralytics' own rules (never downloading)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from yolo_batch.errors import InputError
from yolo_batch.ultralytics_adapter.session import offline, one_line, quiet


def check_dataset(data: str | Path, shown: str | Path | None = None) -> dict[str, Any]:
    """Validate a local data yaml the way Ultralytics will read it (``autodownload=False``); messages name
    ``shown`` (the user's yaml, where ``data`` is a resolved copy of it).

    Raises:
        InputError: missing file, malformed yaml, missing keys or image folders.
    """
    path = Path(data)
    data = data if shown is None else shown
    if not path.is_file():
        raise InputError(f"data yaml not found: {data}")
    try:
        content = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed data yaml {data}: {one_line(exc)}") from None
    if not isinstance(content, dict):
        raise InputError(f"malformed data yaml {data}: expected a mapping with train, val and names")
    with quiet():
        from ultralytics.data.utils import check_det_dataset

        try:
            return dict(check_det_dataset(str(path.resolve()), autodownload=False))
        except (SyntaxError, TypeError, ValueError, FileNotFoundError, AssertionError, KeyError) as exc:
            raise InputError(f"invalid data yaml {data}: {one_line(exc)}") from None


def image_formats() -> frozenset[str]:
    """File extensions (lower case, no dot) Ultralytics reads as images."""
    with offline():
        from ultralytics.data.utils import IMG_FORMATS

        return frozenset(IMG_FORMATS)


def label_paths(images: Sequence[str | Path]) -> list[Path]:
    """The label file Ultralytics reads for each image (``images/`` -> ``labels/``, ``.txt``)."""
    with offline():
        from ultralytics.data.utils import img2label_paths

        return [Path(p) for p in img2label_paths([str(p) for p in images])]


def validate_train_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Check pass-through training arguments with Ultralytics' own rules; its message becomes one line.

    Raises:
        InputError: an unknown key or a value of the wrong type or range.
    """
    values = dict(args)
    with quiet():
        from ultralytics.cfg import check_dict_alignment, get_cfg
        from ultralytics.utils import DEFAULT_CFG_DICT

        try:
            check_dict_alignment(DEFAULT_CFG_DICT, values)
            get_cfg(overrides=values)
        except (SyntaxError, TypeError, ValueError) as exc:
            raise InputError(one_line(exc)) from None
    return values

