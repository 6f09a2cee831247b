"""Keep an Ultralytics export's detection head at fp32 when OpenVINO runs the rest at bf16 or fp16.

OpenVINO's CPU plugin lowers every convolution to bf16 under its bf16 hint, the Detect head's too. The head
decides where box edges land (the DFL expectation over 16 bins, up to 15 grid cells, times the stride) and
which class wins among close scores; at bf16's 8 significant bits the edges move by up to 2 px at stride 32 and
close classes swap. That cost 2 points of agreement with fp32 on the BCCD model (docs/benchmarks.md). The same
reasoning as :func:`yolo_batch.ultralytics_adapter.keep_ends_fp32` for torch; here it is said to OpenVINO with the
IR's ``precise`` runtime attribute (the old ``disable_fp16_compression``, which the IR reader turns into its
current form): the CPU plugin keeps a node so marked at its original precision.

The head is found by structure, not by every node's name: its convolutions are the only ones named after the
last ``model.N`` layer (the PyTorch frontend names a convolution by its module path, while it names shared
activations after whichever module used them last), and every node downstream of them is head as well (box
and class branches, DFL, anchor decoding, up to the output).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

_LAYER = re.compile(r"__module\.model\.(\d+)[./]")
_CONVOLUTIONS = {"Convolution", "GroupConvolution"}
PRECISE = {"name": "precise", "version": "0"}


@dataclass(frozen=True)
class MarkedHead:
    """The IR with its head marked, and what was marked (``nodes`` 0: nothing found, ``reason`` says why)."""

    xml: bytes
    layer: int | None
    nodes: int
    reason: str


def mark_head_precise(xml: bytes) -> MarkedHead:
    """Mark every node of the Detect head in an OpenVINO IR (its ``.xml`` text) to run at its original precision.

    Returns the IR unchanged (``nodes`` 0) when it holds no convolution named after an Ultralytics layer, so a
    foreign export still runs, wholly at the lower precision, with the reason recorded.
    """
    root = ET.fromstring(xml)
    layers = {layer.get("id", ""): layer for layer in root.iter("layer")}
    indices = [int(m.group(1)) for layer in layers.values() if (m := _LAYER.match(layer.get("name", "")))]
    if not indices:
        return MarkedHead(xml, None, 0, "no layer named after an Ultralytics module (model.N) in the IR")
    head = max(indices)
    prefix = f"__module.model.{head}."
    seeds = [i for i, layer in layers.items()
             if layer.get("type") in _CONVOLUTIONS and layer.get("name", "").startswith(prefix)]
    if not seeds:
        return MarkedHead(xml, head, 0, f"no convolution named after the last layer (model.{head}) in the IR")
    marked = _downstream(seeds, root)
    for layer_id in marked:
        layer = layers[layer_id]
        if layer.get("type") == "Result":
            continue
        info = layer.find("rt_info")
        if info is None:
            info = ET.Element("rt_info")
            layer.insert(1 if layer.find("data") is not None else 0, info)  # the IR reader wants it before ports
        if not any(a.get("name") == PRECISE["name"] for a in info.iter("attribute")):
            ET.SubElement(info, "attribute", PRECISE)
    return MarkedHead(ET.tostring(root), head, len(marked), f"model.{head} (the Detect head) kept at fp32")


def _downstream(seeds: list[str], root: ET.Element) -> set[str]:
    """``seeds`` and every layer their outputs reach, by the IR's edges."""
    consumers: dict[str, list[str]] = {}
    for edge in root.iter("edge"):
        consumers.setdefault(edge.get("from-layer", ""), []).append(edge.get("to-layer", ""))
    reached: set[str] = set()
    pending = list(seeds)
    while pending:
        layer = pending.pop()
        if layer not in reached:
            reached.add(layer)
            pending.extend(consumers.get(layer, ()))
    return reached
