"""ONNX Runtime: the ONNX model Ultralytics exported (dynamic batch and image size), on the CPU or a CUDA GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yolo_batch.inference.runtimes.base import normalised


class OnnxRuntime:
    """An ``onnxruntime.InferenceSession`` that takes the engine's uint8 batches.

    ``InferenceSession.run`` is thread-safe, so every inference stream shares one session; each run uses
    ``threads`` intra-op threads. On a GPU the CUDA provider runs it (fp16 exports take fp32 inputs: Ultralytics
    keeps the graph's input type).

    Args:
        artefact: the ``.onnx`` file.
        precision: fp32, or fp16 on a GPU.
        device: the run's ``torch.device``.
        threads: intra-op threads per run.
    """

    name = "onnxruntime"

    def __init__(self, artefact: Path, precision: str, device: Any, threads: int = 1) -> None:
        import onnxruntime
        import torch

        self.precision = precision
        self.device = torch.device("cpu")  # outputs come back to the host; NMS runs there
        self.pin_memory = False
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = onnxruntime.InferenceSession(str(artefact), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.version = onnxruntime.__version__

    def __call__(self, host: Any) -> Any:
        import torch

        x = normalised(host, torch.device("cpu"), torch.float32).numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    def release(self) -> None:
        pass
