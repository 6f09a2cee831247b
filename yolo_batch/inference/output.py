"""A run's output folder: checked before any work, cleared on ``--overwrite``, its manifest written.

The checks make the README's promise hold for the folder: a problem is one line and exit 2 before a model is
loaded, never a traceback at the first write, and nothing in the folder is replaced without being asked:

* ``--out`` must be a folder we can write (or create), and our own entries in it of the right kind and writable;
* files with our names but no ``run.json`` beside them are someone else's: refused unless ``--overwrite``;
* a folder holding results made with other settings, or with other weights (by content, so a retrained
  ``best.pt`` at the same path is another model and the same file by another path is not), is refused.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from yolo_batch.core.checks import check_writable_entries, check_writable_folder
from yolo_batch.core.files import write_json
from yolo_batch.errors import InputError
from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.runtimes.choice import RuntimeChoice
from yolo_batch.inference.writers import OutputFile

OWN_FILES = (OutputFile.RESULTS, OutputFile.ERRORS, OutputFile.CSV, OutputFile.SUMMARY, OutputFile.MANIFEST)
OWN_FOLDERS = (OutputFile.LABELS, OutputFile.ANNOTATED)


def check_output(config: InferConfig, choice: RuntimeChoice, weights: str) -> None:
    """Refuse an output folder the run could not write, or whose contents it would mix or replace unasked.

    Args:
        weights: the model's identity by content (:func:`yolo_batch.core.models.model_fingerprint`).

    Raises:
        InputError: one line naming the problem and the way out.
    """
    out = config.out
    check_writable_folder(out, "--out")
    check_writable_entries(out, [f.value for f in OWN_FILES], [f.value for f in OWN_FOLDERS])
    if config.overwrite or not out.is_dir():
        return
    manifest = out / OutputFile.MANIFEST.value
    if not manifest.exists():
        foreign = [f.value for f in (*OWN_FILES, *OWN_FOLDERS) if (out / f.value).exists()]
        if foreign:
            raise InputError(f"{out} holds {', '.join(foreign)} but no {OutputFile.MANIFEST.value}, so not results "
                             f"of yolo-batch infer: use another --out, or --overwrite to replace them")
        return
    try:
        before = json.loads(manifest.read_text()).get("result_settings")
    except (ValueError, AttributeError):
        before = None
    changed = settings_changed(before, result_settings(config, choice, weights))
    if changed:
        raise InputError(f"{out} holds results made with other settings ({changed}): "
                         f"use --overwrite to start fresh, or another --out")


def result_settings(config: InferConfig, choice: RuntimeChoice, weights: str) -> dict[str, Any]:
    """What a resumed run must share with the first: the config's result settings and the weights' content."""
    return {**config.result_settings(choice.backend, choice.precision), "weights": weights}


def settings_changed(before: Any, now: dict[str, Any]) -> str:
    """``"key old -> new, ..."`` for the settings that differ ('' when none).

    A manifest from before a key was recorded lacks it, and it is not compared. Where both record the weights
    by content, the model's path text is not compared: the same file may be named another way.
    """
    if not isinstance(before, dict):
        return ""
    skip = {"model"} if "weights" in before else set()
    return ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in now
                     if k in before and k not in skip and before[k] != now[k])


def clear_output(config: InferConfig) -> None:
    """Create the folder; with ``overwrite`` remove our own files from it (never anything else)."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        for name in OWN_FILES:
            (out / name.value).unlink(missing_ok=True)
        for folder in OWN_FOLDERS:
            shutil.rmtree(out / folder.value, ignore_errors=True)


def write_manifest(config: InferConfig, choice: RuntimeChoice, weights: str) -> None:
    write_json(config.out / OutputFile.MANIFEST.value,
               {"result_settings": result_settings(config, choice, weights), "runtime": choice.to_dict(),
                "config": config.to_dict()})
