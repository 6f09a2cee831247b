"""The Ultralytics internals the inference engine relies on or copies. These fail when an upgrade moves them."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from yolo_batch import ultralytics_adapter as ua
from yolo_batch.inference.letterbox import (
    apply_letterbox,
    boxes_to_source,
    plan_letterbox,
)

SHAPES = [(480, 640), (426, 640), (640, 481), (500, 381), (37, 1001), (1, 1), (641, 639)]


@pytest.mark.parametrize("h, w", SHAPES)
@pytest.mark.parametrize("auto", [True, False])
def test_our_letterbox_is_ultralytics_letterbox_pixel_for_pixel(h, w, auto):
    image = np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ours = apply_letterbox(image, plan_letterbox(h, w, 320, 32, auto=auto))
    theirs = ua.reference_letterbox(image, 320, 32, auto=auto)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("h, w", SHAPES)
def test_our_box_scaling_is_ultralytics_scale_boxes(h, w):
    ua.import_ultralytics()
    from ultralytics.utils.ops import scale_boxes

    plan = plan_letterbox(h, w, 320, 32)
    boxes = np.random.default_rng(0).uniform(0, 320, (50, 4)).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    theirs = scale_boxes(plan.out, torch.from_numpy(boxes.copy()), (h, w)).numpy()
    np.testing.assert_allclose(boxes_to_source(boxes, plan), theirs, atol=1e-3)


def test_predictor_still_preprocesses_and_post_processes_as_we_copy():
    ua.import_ultralytics()
    from ultralytics.engine.predictor import BasePredictor
    from ultralytics.models.yolo.detect.predict import DetectionPredictor

    pre = inspect.getsource(BasePredictor.preprocess)
    assert "flip(1)" in pre and "div_(255)" in pre  # BGR->RGB, 0..255 -> 0..1
    assert "auto=same_shapes" in inspect.getsource(BasePredictor.pre_transform)
    post = inspect.getsource(DetectionPredictor.postprocess)
    assert "nms.non_max_suppression(" in post and "end2end" in post
    assert "scale_boxes" in inspect.getsource(DetectionPredictor.construct_result)


def test_nms_takes_the_arguments_we_pass():
    ua.import_ultralytics()
    from ultralytics.utils.nms import non_max_suppression

    params = inspect.signature(non_max_suppression).parameters
    for name in ("conf_thres", "iou_thres", "classes", "agnostic", "max_det", "nc", "end2end", "max_time_img"):
        assert name in params
    raw = torch.zeros(2, 4 + 3, 10)
    raw[:, :4] = torch.tensor([50.0, 50, 20, 20])[:, None]
    raw[0, 4, 3] = 0.9
    out = ua.non_max_suppression(raw, 0.5, 0.7, None, 300, end2end=False)
    assert [tuple(o.shape) for o in out] == [(1, 6), (0, 6)]
    assert out[0][0, 4].item() == pytest.approx(0.9) and out[0][0, 5].item() == 0


def test_inference_network_is_fused_eval_and_typed():
    model = ua.load_model("yolo11n.yaml")
    net = ua.inference_network(model, torch.device("cpu"), half=True)
    assert not net.half  # FP16 on CPU is refused, as Ultralytics does
    assert net.stride == 32 and not net.end2end and len(net.names) == 80
    assert not net.module.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.module.modules())  # fused into the convs
    assert all(not p.requires_grad for p in net.module.parameters())
    assert model.model.training or any(isinstance(m, torch.nn.BatchNorm2d) for m in model.model.modules())
    with torch.inference_mode():
        raw = net.module(torch.zeros(1, 3, 64, 96))
    first = raw[0] if isinstance(raw, (list, tuple)) else raw
    assert tuple(first.shape) == (1, 84, (64 * 96) // 64 + (64 * 96) // 256 + (64 * 96) // 1024)
