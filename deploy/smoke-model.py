"""A model and images for deploy/smoke.sh, made offline inside the image: python smoke-model.py OUT_DIR.

No weights can be downloaded, and yolo11n built from its yaml scores every box near zero, so a detection
would check nothing. As the test suite's detector does (tests/inference_fixtures.py), this sets every
BatchNorm's running statistics from real images and a class bias, which makes the net find boxes whose
positions depend on the image. Writes OUT_DIR/model.pt (Ultralytics' checkpoint format, loads with
YOLO(path)) and OUT_DIR/images/*.jpg (the built-in synthetic `shapes` validation images).
"""

from __future__ import annotations

import sys
from pathlib import Path

CLASS_BIAS = -3.0  # as the tests: at imgsz 160, conf 0.25, a few to tens of boxes on most images
IMGSZ = 160
IMAGES = 8


def main(out: Path) -> int:
    import cv2
    import torch
    from ultralytics import YOLO
    from yolo_batch_datasets import render_sample

    (out / "images").mkdir(parents=True, exist_ok=True)
    batch = []
    for index in range(IMAGES):
        image = render_sample("shapes", split="val", index=index).image  # BGR uint8
        cv2.imwrite(str(out / "images" / f"shapes-{index}.jpg"), image)
        resized = cv2.resize(image, (IMGSZ, IMGSZ))[:, :, ::-1].copy()
        batch.append(torch.from_numpy(resized).permute(2, 0, 1))
    torch.manual_seed(0)
    yolo = YOLO("yolo11n.yaml")
    net = yolo.model
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics exactly
    net.train()
    with torch.no_grad():
        net(torch.stack(batch).float() / 255)
        for branch in net.model[-1].cv3:
            branch[-1].bias.fill_(CLASS_BIAS)
    net.eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.03
    yolo.save(str(out / "model.pt"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python smoke-model.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
