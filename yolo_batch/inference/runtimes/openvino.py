"""OpenVINO on the CPU: the IR Ultralytics exported, with our input conversion folded into the compiled graph.

The engine hands over uint8 NHWC BGR batches; OpenVINO's PrePostProcessor adds the conversion to float NCHW RGB
/ 255 in front of the network, so it runs inside OpenVINO's own threads instead of in numpy. The precision is
OpenVINO's ``INFERENCE_PRECISION_HINT`` (bf16 is its default on CPUs that have it; fp32 is forced explicitly).
One compiled model serves every inference stream: one OpenVINO stream per pipeline stream, and an infer
request per calling thread. Below fp32 the Detect head's class branch and DFL stay at fp32 (:mod:`.openvino_head`
says why and how).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from yolo_batch.core.telemetry import import_openvino
from yolo_batch.inference.runtimes.openvino_head import mark_head_precise

log = logging.getLogger(__name__)

_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def model_file(artefact: Path) -> Path:
    """The ``.xml`` of an OpenVINO export folder (or the file itself)."""
    artefact = Path(artefact)
    return artefact if artefact.suffix == ".xml" else next(artefact.glob("*.xml"))


def compile_config(precision: str, streams: int, threads: int) -> dict[str, Any]:
    """The CPU plugin's settings: ``streams`` parallel requests of ``threads`` threads each, at ``precision``."""
    return {"INFERENCE_PRECISION_HINT": _HINTS[precision], "NUM_STREAMS": str(max(1, streams)),
            "INFERENCE_NUM_THREADS": str(max(1, streams) * max(1, threads)), "PERFORMANCE_HINT": "THROUGHPUT"}


class OpenVinoRuntime:
    """A compiled OpenVINO model that takes the engine's uint8 batches.

    Args:
        artefact: the export folder (or its .xml).
        precision: fp32, bf16 or fp16 (the choice checked the CPU can).
        streams: inference streams calling it at once.
        threads: threads per stream.
        embed_input: fold the uint8 NHWC BGR -> float NCHW RGB conversion into the graph (False: the model takes
            float NCHW RGB in [0, 1], as Ultralytics' own OpenVINO backend feeds it: the benchmark's ceiling).
    """

    name = "openvino"
    pin_memory = False

    def __init__(self, artefact: Path, precision: str, streams: int = 1, threads: int = 1,
                 embed_input: bool = True) -> None:
        import torch

        ov = import_openvino()  # its telemetry off (core/telemetry.py)
        self.precision = precision
        self.device = torch.device("cpu")
        self.embed_input = embed_input
        core = ov.Core()
        self.head = "whole network at fp32"
        if precision == "fp32":
            model = core.read_model(str(model_file(artefact)))
        else:
            model, self.head = _read_with_head_fp32(core, model_file(artefact))
        if embed_input:
            model = _with_uint8_input(model)
        self.compiled = core.compile_model(model, "CPU", compile_config(precision, streams, threads))
        self.version = ov.get_version()
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def __call__(self, host: Any) -> Any:
        import torch

        array = host.numpy() if isinstance(host, torch.Tensor) else host
        request = self._request()
        request.infer({0: array}, share_inputs=True, share_outputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data)  # valid until this thread's next call

    def release(self) -> None:
        pass


def _read_with_head_fp32(core: Any, xml: Path) -> tuple[Any, str]:
    """The IR at ``xml`` with the head's class branch and DFL marked to stay at fp32, and what was marked (or why
    nothing was)."""
    import numpy as np

    ov = import_openvino()
    marked = mark_head_precise(xml.read_bytes())
    if not marked.nodes:
        log.warning("openvino: the whole network runs below fp32: %s", marked.reason)
    weights = ov.Tensor(np.fromfile(xml.with_suffix(".bin"), dtype=np.uint8))
    return core.read_model(model=marked.xml, weights=weights), marked.reason


def _with_uint8_input(model: Any) -> Any:
    """``model`` behind a uint8 NHWC BGR input converted in-graph to float NCHW RGB / 255."""
    from openvino.preprocess import PrePostProcessor

    ov = import_openvino()

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).reverse_channels().scale(255.0)
    return ppp.build()
