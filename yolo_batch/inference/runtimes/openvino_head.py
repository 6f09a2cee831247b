"""Keep the precision-sensitive part of an Ultralytics export's detection head at fp32 when OpenVINO runs the
rest at bf16 or fp16.

OpenVINO's CPU plugin lowers every convolution to bf16 under its bf16 hint, the Detect head's too. At bf16's 8
significant bits the class scores move in the third decimal, and where a weak model proposes overlapping boxes
for one object, NMS then keeps a different one of them: that cost 1-2 points of agreement with fp32 on the BCCD
models (docs/benchmarks.md). Measured there, by which part of the head was kept at fp32: the class branch
(``cv3``) brings the agreement to what the whole head gives (99.3 / 99.0 % against 99.2 / 99.0 %), the box
branch (``cv2``) alone does nothing (98.4 %), and the class branch costs about a third of what the whole head
costs in speed (its convolutions are depthwise). So the class branch and the DFL (the softmax expectation that
places each box edge) are kept at fp32 and the box branch's 3x3 convolutions stay at bf16. The same reasoning as
:func:`yolo_batch.ultralytics_adapter.keep_ends_fp32` for torch; here it is said to OpenVINO with the IR's
``precise`` runtime attribute (the old ``disable_fp16_compression``, which the IR reader turns into its current
form): the CPU plugin keeps a node so marked at its original precision.

The nodes are found by their module path, which the PyTorch frontend gives each convolution and each op of the
DFL (it names shared activations after whichever module used them last, so those names are not used), and
every node downstream of them is marked as well (up to the output). An export whose head has no such branch
gets its whole head marked (every convolution named after the last ``model.N`` layer, and what follows).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

_LAYER = re.compile(r"__module\.model\.(\d+)[./]")
_CONVOLUTIONS = {"Convolution", "GroupConvolution"}
_CLASS_BRANCH = re.compile(r"(?:one2one_)?cv3\.")  # after "model.N.", on convolutions only (module docstring)
_DFL = re.compile(r"dfl[./]")  # after "model.N.", any op
PRECISE = {"name": "precise", "version": "0"}


@dataclass(frozen=True)
class MarkedHead:
    """The IR with its head marked, and what was marked (``nodes`` 0: nothing found, ``reason`` says why)."""

    xml: bytes
    layer: int | None
    nodes: int
    reason: str


def mark_head_precise(xml: bytes) -> MarkedHead:
    """Mark the Detect head's class branch and DFL in an OpenVINO IR (its ``.xml`` text), and every node after
    them, to run at their original precision (the module docstring says why these).

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
    convolutions = {i: layer.get("name", "")[len(prefix):] for i, layer in layers.items()
                    if layer.get("type") in _CONVOLUTIONS and layer.get("name", "").startswith(prefix)}
    if not convolutions:
        return MarkedHead(xml, head, 0, f"no convolution named after the last layer (model.{head}) in the IR")
    seeds = [i for i, path in convolutions.items() if _CLASS_BRANCH.match(path)]
    seeds += [i for i, layer in layers.items() if layer.get("type") != "Const"
              and layer.get("name", "").startswith(prefix) and _DFL.match(layer.get("name", "")[len(prefix):])]
    what = f"model.{head}'s class branch and DFL kept at fp32"
    if not seeds:
        seeds, what = list(convolutions), f"model.{head} (no class branch or DFL by name: the whole head) kept at fp32"
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
    return MarkedHead(ET.tostring(root), head, len(marked), what)


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
