"""Decisions cached on disk, so a second run on the same GPU, model and settings answers at once."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yolo_batch.training.decision import AutoBatchDecision

log = logging.getLogger(__name__)


def cache_key(fields: Mapping[str, Any]) -> str:
    """Stable hash of the fields that decide peak memory."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True, default=str).encode()).hexdigest()[:24]


class DecisionCache:
    """A folder of ``<key>.json`` decisions."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def load(self, key: str) -> AutoBatchDecision | None:
        path = self.folder / f"{key}.json"
        try:
            return AutoBatchDecision.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError, KeyError) as exc:  # a corrupt entry is a miss, not a crash
            log.warning("ignoring unreadable cache entry %s: %s", path, exc)
            return None

    def store(self, key: str, decision: AutoBatchDecision) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return decision.save(self.folder / f"{key}.json")
