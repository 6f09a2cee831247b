"""Which model a run uses: the default, and a model's identity by content (not by the path that names it)."""

from __future__ import annotations

from pathlib import Path

from yolo_batch.core.files import sha256_file

DEFAULT_MODEL = "yolo11n.yaml"  # Ultralytics builds it from its yaml (random weights): nothing is downloaded


def model_fingerprint(spec: str) -> str:
    """A local .pt or yaml file by content hash; an Ultralytics yaml name by name (its content ships with
    Ultralytics, whose version callers key on separately)."""
    path = Path(spec)
    if path.is_file():
        kind = "pt" if path.suffix == ".pt" else "yaml"
        return f"{kind}:{sha256_file(path)[:16]}"
    return f"name:{spec}"
