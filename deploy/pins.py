"""Print the pins for deploy/constraints.txt (or, given extras, for deploy/constraints-extras.txt).

Run inside a built image, where the installed versions are the ones to keep (README: "Updating the pins"):
    docker run --rm --entrypoint python -v "$PWD/deploy/pins.py:/pins.py:ro" yolo-batch:0.1.0 /pins.py
    docker run --rm --entrypoint python -v "$PWD/deploy/pins.py:/pins.py:ro" yolo-batch:0.1.0 /pins.py fast-jpeg

The walk starts at yolo-batch's own requirements and stops at torch and torchvision: those, and what only they
need, belong to the base image (a CUDA PyTorch image, or deploy/local-base/torch-constraints.txt).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

BASE_PROVIDED = {"torch", "torchvision"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(extras: tuple[str, ...] = ()) -> dict[str, str]:
    """``{normalised name: "Name==version"}`` for what installing yolo-batch[extras] pulls in, as installed."""
    pins: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [("yolo-batch", extras)]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            markers = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            if requirement.marker is not None and not any(requirement.marker.evaluate(m) for m in markers):
                continue
            key = _normal(requirement.name)
            if key in BASE_PROVIDED or key in pins:
                continue
            dist = metadata.distribution(requirement.name)
            pins[key] = f"{dist.metadata['Name']}=={dist.version}"
            todo.append((requirement.name, tuple(requirement.extras)))
    return pins


def main(extras: list[str]) -> int:
    pins = closure(tuple(extras))
    if extras:  # only what the extras add to the default install
        default = closure()
        pins = {key: pin for key, pin in pins.items() if key not in default}
    for key in sorted(pins):
        print(pins[key])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
