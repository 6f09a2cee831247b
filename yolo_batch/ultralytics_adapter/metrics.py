"""Ultralytics' average precision, so that ``bench accuracy`` reads like its ``val``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from yolo_batch.ultralytics_adapter.session import offline


def mean_average_precision(correct: Sequence[np.ndarray], confidence: Sequence[np.ndarray],
                           predicted_class: Sequence[np.ndarray], label_class: Sequence[np.ndarray]
                           ) -> tuple[float, float]:
    """mAP50 and mAP50-95 by Ultralytics' ``ap_per_class`` over per-image arrays.

    Args:
        correct: per image, an (n, 10) bool array: prediction i is a true positive at IoU 0.50, 0.55, ... 0.95.
        confidence: per image, the n predictions' scores.
        predicted_class: per image, the n predictions' classes.
        label_class: per image, the labels' classes.
    """
    with offline():
        from ultralytics.utils.metrics import ap_per_class

        if not sum(len(c) for c in label_class):
            return 0.0, 0.0
        result = ap_per_class(np.concatenate(correct), np.concatenate(confidence), np.concatenate(predicted_class),
                              np.concatenate(label_class))
    ap = result[5]  # (classes with labels, 10 IoU thresholds)
    return (float(ap[:, 0].mean()), float(ap.mean())) if len(ap) else (0.0, 0.0)
