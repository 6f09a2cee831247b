"""Deterministic synthetic detection datasets bundled with yolo-batch as its default data."""

from yolo_batch_datasets.synthetic import (
    BUILTIN_SETS,
    GENERATOR_VERSION,
    SyntheticSample,
    SyntheticSpec,
    cached_dataset,
    default_dataset,
    list_builtin,
    make_dataset,
    render_sample,
)

__all__ = [
    "BUILTIN_SETS",
    "GENERATOR_VERSION",
    "SyntheticSample",
    "SyntheticSpec",
    "cached_dataset",
    "default_dataset",
    "list_builtin",
    "make_dataset",
    "render_sample",
]
