"""Deterministic synthetic detection datasets written in the Ultralytics YOLO layout."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import yaml

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "val")
_JPEG_QUALITY = 90
_BACKGROUND_FRACTION = 0.05
_MIN_BOX_PX = 3  # 1-2 px boxes are label noise to a detector and make IoU metrics erratic
_PLACEMENT_TRIES = 20
_DEFAULT_NAME, _DEFAULT_SEED = "shapes", 0
_STALE_TEMP_S = 3600.0  # generation takes about a second, so an hour-old temp folder was abandoned


@dataclass(frozen=True)
class SyntheticSpec:
    """Recipe of one built-in synthetic set."""

    name: str
    description: str
    class_names: tuple[str, ...]
    n_train: int
    n_val: int
    imgsz: int
    max_objects: int
    grey: bool = False
    style: str = ""  # how images are drawn ("shapes" or "defects"); empty: the set's own name
    object_scale: float = 1.0  # object sizes as a multiple of the style's own size range

    @property
    def painter(self) -> str:
        return self.style or self.name


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image with its ground truth, before JPEG encoding."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    background: np.ndarray  # the same image before any object was drawn
    boxes: np.ndarray  # (N, 4) float xyxy in pixel-edge coordinates, tight around the drawn pixels
    class_ids: np.ndarray  # (N,) int


BUILTIN_SETS: Mapping[str, SyntheticSpec] = MappingProxyType({
    "shapes": SyntheticSpec(
        "shapes", "Filled circles, rectangles, triangles and crosses on textured colour backgrounds.",
        ("circle", "rectangle", "triangle", "cross"), n_train=64, n_val=16, imgsz=256, max_objects=8),
    "defects": SyntheticSpec(
        "defects", "Scratches, dents and cracks on brushed grey metal (industrial-inspection look).",
        ("scratch", "dent", "crack"), n_train=64, n_val=16, imgsz=320, max_objects=6, grey=True),
    # the demo's set: what a from-scratch yolo11n learns in minutes on a CPU (see yolo_batch.demo)
    "big-shapes": SyntheticSpec(
        "big-shapes", "The shapes classes twice as large (about a quarter of the image), 1-4 per image, at 128 px: "
        "learnable from scratch in minutes on a CPU (yolo-batch demo).",
        ("circle", "rectangle", "triangle", "cross"), n_train=256, n_val=32, imgsz=128, max_objects=4,
        style="shapes", object_scale=2.0),
})


def list_builtin() -> list[SyntheticSpec]:
    """Return the recipes of all built-in sets, the default ("shapes") first."""
    return list(BUILTIN_SETS.values())


# --- object masks: (rng, s, k) -> uint8 (s, s) mask, 255 where the object is drawn; k scales its size ----
# Hard-edged (LINE_8) drawing keeps the mask exactly equal to the painted pixels, so boxes are exact.

def _centre(rng: np.random.Generator, s: int) -> np.ndarray:
    return rng.uniform(0.06 * s, 0.94 * s, size=2)  # off the very edge: clipped objects stay recognisable


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _fill(s: int, points: np.ndarray) -> np.ndarray:
    return cv2.fillPoly(np.zeros((s, s), np.uint8), [np.rint(points).astype(np.int32)], 255, cv2.LINE_8)


def _stroke(rng: np.random.Generator, s: int, points: np.ndarray) -> np.ndarray:
    points = np.rint(points).astype(np.int32)
    return cv2.polylines(np.zeros((s, s), np.uint8), [points], False, 255, int(rng.integers(1, 3)), cv2.LINE_8)


def _rect(centre: np.ndarray, half_w: float, half_h: float, angle: float) -> np.ndarray:
    corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    return corners @ np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) + centre


def _circle(rng: np.random.Generator, s: int, k: float) -> np.ndarray:
    radius = int(round(rng.uniform(0.04, 0.14) * k * s))
    return cv2.circle(np.zeros((s, s), np.uint8), _pt(_centre(rng, s)), radius, 255, -1, cv2.LINE_8)


def _rectangle(rng: np.random.Generator, s: int, k: float) -> np.ndarray:
    half = rng.uniform(0.04, 0.15, size=2) * k * s
    return _fill(s, _rect(_centre(rng, s), half[0], half[1], rng.uniform(0, np.pi)))


def _triangle(rng: np.random.Generator, s: int, k: float) -> np.ndarray:
    angles = rng.uniform(0, 2 * np.pi) + np.radians(np.array([0, 120, 240]) + rng.uniform(-25, 25, size=3))
    radii = rng.uniform(0.06, 0.16) * k * s * rng.uniform(0.8, 1.0, size=3)
    return _fill(s, _centre(rng, s) + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None])


def _cross(rng: np.random.Generator, s: int, k: float) -> np.ndarray:
    centre, arm, angle = _centre(rng, s), rng.uniform(0.06, 0.15) * k * s, rng.uniform(0, np.pi / 2)
    bar = arm * rng.uniform(0.25, 0.4)
    return _fill(s, _rect(centre, arm, bar, angle)) | _fill(s, _rect(centre, bar, arm, angle))


def _scratch(rng: np.random.Generator, s: int, k: float) -> np.ndarray:
    centre, angle, half = _centre(rng, s), rng.uniform(0, np.pi), rng.uniform(0.08, 0.25) * k * s
    offset = half * np.array([np.cos(angle), np.sin(angle)])
    return _stroke(rng, s, np.stack([centre - offset, centre + offset]))


def _dent(rng: np.random.Generator, s: int, k: float) -> np.ndarray:
    a = rng.uniform(0.02, 0.07) * k * s
    axes = (int(round(a)), int(round(a * rng.uniform(0.5, 1.0))))
    centre, angle = _pt(_centre(rng, s)), rng.uniform(0, 180)
    return cv2.ellipse(np.zeros((s, s), np.uint8), centre, axes, angle, 0, 360, 255, -1, cv2.LINE_8)


def _crack(rng: np.random.Generator, s: int, k: float) -> np.ndarray:
    # a random walk whose heading drifts reads as a crack; straight segments would read as scratches
    n = int(rng.integers(6, 14))
    headings = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(-0.8, 0.8, size=n))
    steps = rng.uniform(0.02, 0.05, size=(n, 1)) * k * s * np.stack([np.cos(headings), np.sin(headings)], 1)
    return _stroke(rng, s, _centre(rng, s) + np.vstack([[0.0, 0.0], np.cumsum(steps, 0)]))


_MASKERS: Mapping[str, Callable[[np.random.Generator, int, float], np.ndarray]] = MappingProxyType({
    "circle": _circle, "rectangle": _rectangle, "triangle": _triangle, "cross": _cross,
    "scratch": _scratch, "dent": _dent, "crack": _crack})


# --- backgrounds and painting ---------------------------------------------------------------------

def _low_freq(rng: np.random.Generator, s: int, channels: int) -> np.ndarray:
    # upsampling a tiny random grid gives smooth blobs, so backgrounds are never trivially flat
    grid = rng.uniform(-1, 1, size=(int(rng.integers(3, 7)),) * 2 + (channels,)).astype(np.float32)
    return cv2.resize(grid, (s, s), interpolation=cv2.INTER_CUBIC).reshape(s, s, channels)


def _gradient(rng: np.random.Generator, s: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    return (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]


def _colour_background(rng: np.random.Generator, s: int) -> np.ndarray:
    # one grey level plus small per-channel blobs keeps backgrounds muted next to the saturated shapes
    img = rng.uniform(90, 170) + rng.uniform(-15, 15, size=3) + 35 * _low_freq(rng, s, 3)
    img = img + rng.uniform(20, 60) * _gradient(rng, s)
    return img + rng.normal(0, rng.uniform(4, 10), size=(s, s, 3))


def _metal_background(rng: np.random.Generator, s: int) -> np.ndarray:
    streaks = cv2.blur(rng.normal(0, 1, size=(s, s)).astype(np.float32), (int(rng.integers(15, 42)), 1))
    streaks = streaks / (streaks.std() + 1e-6) * rng.uniform(6, 14)  # brushed along x ...
    if rng.random() < 0.5:
        streaks = np.ascontiguousarray(streaks.T)  # ... or along y
    img = rng.uniform(110, 170) + streaks[..., None] + 25 * _low_freq(rng, s, 1) + 30 * _gradient(rng, s)
    return img + rng.normal(0, 3, size=(s, s, 1))


# BGR, far apart so colour is a usable cue; the jitter in _paint_shape keeps it from being the only one
_SHAPE_COLOURS = MappingProxyType(
    {"circle": (40, 40, 210), "rectangle": (200, 90, 30), "triangle": (50, 180, 50), "cross": (30, 200, 220)})


def _paint_shape(rng: np.random.Generator, img: np.ndarray, where: np.ndarray, name: str) -> None:
    colour = np.asarray(_SHAPE_COLOURS[name], np.float32) + rng.uniform(-30, 30, size=3)
    img[where] = colour + rng.normal(0, 6, size=(int(where.sum()), 3))


def _paint_defect(rng: np.random.Generator, img: np.ndarray, where: np.ndarray, name: str) -> None:
    # defects shift the metal's brightness instead of replacing it, so the brushing shows through
    if name == "scratch":
        delta, alpha = rng.choice([-1, 1]) * rng.uniform(50, 90), rng.uniform(0.7, 0.95)
    elif name == "dent":
        delta, alpha = -rng.uniform(60, 90), rng.uniform(0.5, 0.8)
    else:
        delta, alpha = -rng.uniform(90, 120), rng.uniform(0.85, 1.0)
    img[where] += alpha * delta


_STYLES = MappingProxyType(
    {"shapes": (_colour_background, _paint_shape), "defects": (_metal_background, _paint_defect)})


def _render(spec: SyntheticSpec, rng: np.random.Generator, empty: bool) -> SyntheticSample:
    s, (make_background, paint) = spec.imgsz, _STYLES[spec.painter]
    background = np.clip(np.rint(make_background(rng, s)), 0, 255).astype(np.uint8)
    img, occupied = background.astype(np.float32), np.zeros((s, s), bool)
    boxes: list[np.ndarray] = []
    class_ids: list[int] = []
    for _ in range(0 if empty else int(rng.integers(1, spec.max_objects + 1))):
        cls = int(rng.integers(len(spec.class_names)))
        for _try in range(_PLACEMENT_TRIES):
            where = _MASKERS[spec.class_names[cls]](rng, s, spec.object_scale) > 0
            x, y, w, h = cv2.boundingRect(where.astype(np.uint8))  # of the clipped mask: the visible extent
            # disjoint masks: nothing is ever occluded, so every box stays tight around visible pixels
            if min(w, h) >= _MIN_BOX_PX and not (occupied & where).any():
                break
        else:
            continue  # crowded image: drop the object rather than label an overlapping one
        paint(rng, img, where, spec.class_names[cls])
        occupied |= where
        boxes.append(np.array([x, y, x + w, y + h], np.float64))
        class_ids.append(cls)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if spec.grey:
        image, background = np.repeat(image, 3, axis=2), np.repeat(background, 3, axis=2)
    return SyntheticSample(image, background, np.array(boxes, np.float64).reshape(-1, 4), np.array(class_ids))


# --- public generation API -----------------------------------------------------------------------

def _get_spec(name: str, seed: int) -> SyntheticSpec:
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown dataset {name!r}; built-in sets: {', '.join(sorted(BUILTIN_SETS))}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return BUILTIN_SETS[name]


def _split_size(spec: SyntheticSpec, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    return spec.n_train if split == "train" else spec.n_val


def _rng(spec: SyntheticSpec, seed: int, split: str, index: int) -> np.random.Generator:
    # one independent stream per image (crc32, not hash(): stable across processes), so any image
    # can be re-rendered alone and identically
    return np.random.default_rng([seed, zlib.crc32(spec.name.encode()), SPLITS.index(split), index])


def _empty_indices(spec: SyntheticSpec, seed: int, split: str) -> set[int]:
    # drawn per split rather than per image so each split reliably gets its ~5 % background images
    n = _split_size(spec, split)
    chosen = _rng(spec, seed, split, 2**32).choice(n, size=round(_BACKGROUND_FRACTION * n), replace=False)
    return {int(i) for i in chosen}


def render_sample(name: str, *, split: str = "train", index: int = 0, seed: int = 0) -> SyntheticSample:
    """Render one image of a built-in set in memory, exactly as `make_dataset` writes it (before JPEG)."""
    spec = _get_spec(name, seed)
    if not 0 <= index < _split_size(spec, split):
        raise ValueError(f"index must be in [0, {_split_size(spec, split)}) for split {split!r}, got {index}")
    return _render(spec, _rng(spec, seed, split, index), index in _empty_indices(spec, seed, split))


def _write_dataset(spec: SyntheticSpec, root: Path, seed: int) -> None:
    s = spec.imgsz
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        empty = _empty_indices(spec, seed, split)
        for i in range(_split_size(spec, split)):
            sample = _render(spec, _rng(spec, seed, split, i), i in empty)
            ok, jpeg = cv2.imencode(".jpg", sample.image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"OpenCV failed to encode {spec.name} {split} image {i}")
            # imencode + write_bytes rather than imwrite, which fails on non-ASCII paths on Windows
            (root / "images" / split / f"{split}_{i:04d}.jpg").write_bytes(jpeg.tobytes())
            (root / "labels" / split / f"{split}_{i:04d}.txt").write_text("".join(
                f"{c} {(x0 + x1) / 2 / s:.6f} {(y0 + y1) / 2 / s:.6f} {(x1 - x0) / s:.6f} {(y1 - y0) / s:.6f}\n"
                for (x0, y0, x1, y1), c in zip(sample.boxes, sample.class_ids)))
    provenance = f"yolo_batch_datasets generator v{GENERATOR_VERSION}, set {spec.name!r}, seed {seed}"
    (root / "README.txt").write_text(
        f"Synthetic detection dataset: {provenance}.\n{spec.description}\nClasses: {', '.join(spec.class_names)}. "
        f"Images: {spec.n_train} train, {spec.n_val} val, {s}x{s} JPEG.\n"
        f"Regenerate: yolo_batch_datasets.make_dataset({spec.name!r}, out_dir, seed={seed})\n")
    # no 'path:' key: Ultralytics then resolves train/val against this file's folder, so the set can move
    body = {"train": "images/train", "val": "images/val", "nc": len(spec.class_names),
            "names": dict(enumerate(spec.class_names))}
    # written last, so a data.yaml only exists next to a finished set
    (root / "data.yaml").write_text(f"# synthetic: {provenance}\n" + yaml.safe_dump(body, sort_keys=False))


def _remove(path: Path) -> None:
    # symlinks are unlinked, never followed: nothing outside the target folder is ever deleted
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def make_dataset(name: str, out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write built-in set `name` into `out_dir` in the YOLO layout and return the path of its data.yaml.

    A non-empty `out_dir` is refused unless `overwrite=True`, which replaces its images/ and labels/
    folders, data.yaml and README.txt and leaves any other files alone.
    """
    spec, root = _get_spec(name, seed), Path(out_dir)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"output path {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {root} is not empty; pass overwrite=True to replace its dataset")
        for entry in ("images", "labels", "data.yaml", "README.txt"):
            _remove(root / entry)
    root.mkdir(parents=True, exist_ok=True)
    _write_dataset(spec, root, seed)
    logger.debug("wrote synthetic set %r (seed %d) to %s", name, seed, root)
    return root / "data.yaml"


def _is_complete(root: Path, spec: SyntheticSpec) -> bool:
    return (root / "data.yaml").is_file() and all(
        len(list((root / kind / split).glob(f"*.{ext}"))) == _split_size(spec, split)
        for split in SPLITS for kind, ext in (("images", "jpg"), ("labels", "txt")))


def default_dataset(cache_dir: str | os.PathLike) -> Path:
    """Return `cache_dir/shapes-v1/data.yaml`, generating the set first if it is missing or incomplete."""
    return cached_dataset(_DEFAULT_NAME, cache_dir)


def cached_dataset(name: str, cache_dir: str | os.PathLike, *, seed: int = _DEFAULT_SEED) -> Path:
    """Return `cache_dir/<name>-v<version>[-seed<seed>]/data.yaml`, generating the set first if it is missing or
    incomplete.

    The set is generated in a temporary sibling folder and renamed into place only when complete,
    so an interrupted run never leaves a folder that looks finished.
    """
    spec, cache = _get_spec(name, seed), Path(cache_dir)
    suffix = f"-seed{seed}" if seed != _DEFAULT_SEED else ""
    final = cache / f"{spec.name}-v{GENERATOR_VERSION}{suffix}"
    if _is_complete(final, spec):
        return final / "data.yaml"
    cache.mkdir(parents=True, exist_ok=True)
    for leftover in cache.glob(f".{final.name}.tmp-*"):  # from interrupted runs; best-effort cleanup
        try:
            if time.time() - leftover.stat().st_mtime > _STALE_TEMP_S:
                _remove(leftover)
        except OSError:
            pass
    # mkdir rather than tempfile.mkdtemp, so the folder gets the user's umask instead of 0o700
    tmp = cache / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        logger.info("generating built-in dataset %r in %s", spec.name, final)
        _write_dataset(spec, tmp, seed)
        if (final.exists() or final.is_symlink()) and not _is_complete(final, spec):
            # an incomplete leftover: a directory cannot be renamed onto a non-empty one, so move it aside
            stale = cache / f".{final.name}.tmp-stale-{secrets.token_hex(4)}"
            os.replace(final, stale)
            _remove(stale)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final, spec):  # the only acceptable failure: another process finished first
                raise
    finally:
        if tmp.exists():
            _remove(tmp)
    return final / "data.yaml"
