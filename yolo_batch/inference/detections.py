"""One image's result as a value with column arrays, and its converters (supervision, results.jsonl).

A run yields one :class:`Detections` per image: ``xyxy`` (n, 4), ``confidence`` (n,), ``class_id`` (n,), in
original image pixels, with the model's class ``names`` and the image's ``path``, ``width`` and ``height``.
Columns, not a list of box objects: a filter is one boolean mask (``d[d.confidence > 0.5]``), and
:meth:`Detections.to_supervision` hands the same arrays to supervision's annotators, trackers and zones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import supervision

    from yolo_batch.inference.engine import Detection
    from yolo_batch.inference.writers import FailureRecord, ImageRecord


@dataclass(frozen=True, eq=False)
class Detections:
    """The boxes found in one image (or why there are none: ``error``).

    Attributes:
        path: the image's path (absolute, as discovered).
        width, height: the image's size in pixels (0 when it could not be read).
        xyxy: (n, 4) float32 boxes, x1 y1 x2 y2 in the image's pixels.
        confidence: (n,) float32 scores.
        class_id: (n,) int64 class ids.
        names: class id -> name, for every class the model knows.
        timing_ms: per-stage milliseconds for this image (decode, letterbox, inference share, batch size).
        error: ``"kind: reason"`` when the file could not be processed (then there are no boxes).
    """

    path: str
    width: int
    height: int
    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    names: Mapping[int, str] = field(default_factory=dict)
    timing_ms: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        confidence = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        class_id = np.asarray(self.class_id, dtype=np.int64).reshape(-1)
        if not len(xyxy) == len(confidence) == len(class_id):
            raise ValueError(f"column lengths differ: xyxy {len(xyxy)}, confidence {len(confidence)}, "
                             f"class_id {len(class_id)}")
        for name, array in (("xyxy", xyxy), ("confidence", confidence), ("class_id", class_id)):
            array.flags.writeable = False  # a value: share it freely, filter by copying
            object.__setattr__(self, name, array)
        object.__setattr__(self, "names", MappingProxyType({int(k): str(v) for k, v in self.names.items()}))
        object.__setattr__(self, "timing_ms", MappingProxyType(dict(self.timing_ms)))

    def __len__(self) -> int:
        return len(self.class_id)

    def __getitem__(self, index: Any) -> Detections:
        """The rows picked by a boolean mask, an index array or a slice, as a new value."""
        rows = np.arange(len(self))[index]
        return Detections(self.path, self.width, self.height, self.xyxy[rows], self.confidence[rows],
                          self.class_id[rows], self.names, self.timing_ms, self.error)

    @property
    def ok(self) -> bool:
        """Whether the image was processed (an image without boxes is ok)."""
        return self.error is None

    @property
    def class_name(self) -> np.ndarray:
        """(n,) class names, the column supervision's label annotator reads."""
        return np.array([self.names.get(int(c), str(int(c))) for c in self.class_id], dtype=str)

    @classmethod
    def empty(cls, path: str, width: int = 0, height: int = 0, names: Mapping[int, str] | None = None,
              error: str | None = None) -> Detections:
        return cls(path, width, height, np.zeros((0, 4)), np.zeros(0), np.zeros(0), names or {}, error=error)

    @classmethod
    def from_boxes(cls, path: str, width: int, height: int, detections: Sequence[Detection],
                   names: Mapping[int, str], timing_ms: Mapping[str, float] | None = None) -> Detections:
        """From the engine's per-box records (one image)."""
        return cls(path, width, height, np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4),
                   np.array([d.confidence for d in detections]), np.array([d.class_id for d in detections]),
                   names, timing_ms or {})

    @classmethod
    def from_record(cls, record: ImageRecord, names: Mapping[int, str]) -> Detections:
        """From the record the writer stage receives (what ``results.jsonl`` is written from)."""
        return cls.from_boxes(record.path, record.width, record.height, record.detections, names, record.timing_ms)

    @classmethod
    def from_failure(cls, failure: FailureRecord, names: Mapping[int, str]) -> Detections:
        return cls.empty(failure.path, names=names, error=f"{failure.kind}: {failure.reason}")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], names: Mapping[int, str] | None = None) -> Detections:
        """From one ``results.jsonl`` line (names: the model's, else those the line's boxes carry)."""
        boxes = record["detections"]
        known = dict(names) if names is not None else {int(d["class_id"]): d["name"] for d in boxes}
        return cls(record["path"], int(record["width"]), int(record["height"]),
                   np.array([d["box"] for d in boxes], dtype=np.float32).reshape(-1, 4),
                   np.array([d["confidence"] for d in boxes]), np.array([d["class_id"] for d in boxes]), known,
                   record.get("timing_ms", {}))

    def to_dict(self) -> dict[str, Any]:
        """The ``results.jsonl`` line for this image (``infer`` writes the same fields, same rounding)."""
        names = self.class_name
        return {"path": self.path, "width": self.width, "height": self.height,
                "detections": [{"class_id": int(c), "name": str(n), "confidence": round(float(s), 6),
                                "box": [round(float(v), 2) for v in box]}
                               for box, s, c, n in zip(self.xyxy, self.confidence, self.class_id, names)],
                "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()}}

    def to_supervision(self) -> supervision.Detections:
        """A ``supervision.Detections`` with the same arrays, ``data["class_name"]`` and the image in ``metadata``.

        Raises:
            ImportError: supervision is not installed (``pip install 'yolo-batch[supervision]'``).
        """
        try:
            import supervision as sv
        except ImportError:
            raise ImportError("to_supervision() needs supervision: pip install 'yolo-batch[supervision]'") from None
        return sv.Detections(xyxy=self.xyxy.copy(), confidence=self.confidence.copy(),
                             class_id=self.class_id.copy(), data={"class_name": self.class_name},
                             metadata={"path": self.path, "width": self.width, "height": self.height,
                                       "names": dict(self.names)})

    @classmethod
    def from_supervision(cls, detections: supervision.Detections, path: str | None = None,
                         width: int | None = None, height: int | None = None,
                         names: Mapping[int, str] | None = None) -> Detections:
        """Back from supervision (after a filter or a tracker); image fields default to its ``metadata``."""
        meta = detections.metadata
        n = len(detections)
        confidence = detections.confidence if detections.confidence is not None else np.ones(n)
        class_id = detections.class_id if detections.class_id is not None else np.zeros(n)
        return cls(path if path is not None else str(meta.get("path", "")),
                   width if width is not None else int(meta.get("width", 0)),
                   height if height is not None else int(meta.get("height", 0)),
                   detections.xyxy, confidence, class_id,
                   names if names is not None else meta.get("names", {}))

    def __repr__(self) -> str:
        state = f", error={self.error!r}" if self.error else ""
        return f"Detections(path={self.path!r}, {len(self)} box(es), {self.width}x{self.height}{state})"
