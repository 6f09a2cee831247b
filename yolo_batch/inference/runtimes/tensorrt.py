"""TensorRT on an NVIDIA GPU: the ``.engine`` Ultralytics built, with an optimisation profile covering every shape
bucket at the run's imgsz and every batch up to its largest (see
:func:`yolo_batch.ultralytics_adapter.export.export_model`).

Uses TensorRT's named-tensor API (TensorRT 10 and newer). Each calling thread gets its own execution context
(contexts are not thread-safe); inputs are normalised on the GPU by torch, and the engine writes into a torch
tensor on the current CUDA stream.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from yolo_batch import ultralytics_adapter
from yolo_batch.inference.runtimes.base import normalised

_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64"}


class TensorRtRuntime:
    """A deserialised TensorRT engine (see the module docstring).

    Args:
        artefact: the ``.engine`` file (Ultralytics' metadata header first).
        precision: fp32 or fp16 (what the engine was built with).
        device: the CUDA ``torch.device``.
    """

    name = "tensorrt"
    pin_memory = True

    def __init__(self, artefact: Path, precision: str, device: Any) -> None:
        import tensorrt as trt

        if not hasattr(trt.ICudaEngine, "num_io_tensors"):
            raise RuntimeError(f"TensorRT {trt.__version__} is too old: yolo-batch needs TensorRT 10 or newer")
        self.precision = precision
        self.device = device
        self.version = trt.__version__
        offset = ultralytics_adapter.engine_offset(Path(artefact))
        with open(artefact, "rb") as handle:
            handle.seek(offset)
            blob = handle.read()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        import torch

        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {artefact} (built by another TensorRT version or GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_name, self.output_name = inputs[0], next(n for n in names if n not in inputs)
        self.input_dtype = getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(self.input_name).name])
        self.output_dtype = getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(self.output_name).name])
        self._local = threading.local()

    def _context(self) -> Any:
        context = getattr(self._local, "context", None)
        if context is None:
            context = self._local.context = self.engine.create_execution_context()
        return context

    def __call__(self, host: Any) -> Any:
        import torch

        with torch.inference_mode(), torch.cuda.device(self.device):
            x = normalised(host, self.device, self.input_dtype)
            context = self._context()
            if not context.set_input_shape(self.input_name, tuple(x.shape)):
                raise ValueError(f"batch shape {tuple(x.shape)} is outside the TensorRT engine's optimisation "
                                 f"profile: rebuild it for this --imgsz and --batch")
            out = torch.empty(tuple(context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                              device=self.device)
            context.set_tensor_address(self.input_name, x.data_ptr())
            context.set_tensor_address(self.output_name, out.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT refused to run the batch")
            return out.float() if out.dtype != torch.float32 else out

    def release(self) -> None:
        import torch

        torch.cuda.empty_cache()
