"""PyTorch: the fused Ultralytics network itself, fp32, fp16 (GPU) or bf16 autocast with channels_last."""

from __future__ import annotations

import copy
import threading
from typing import Any

from yolo_batch import ultralytics_adapter
from yolo_batch.inference.runtimes.base import ModelInfo, first_output, normalised


class TorchRuntime:
    """The network as Ultralytics' predictor prepares it (fused, eval, on the device).

    bf16 runs under ``torch.autocast`` (weights stay fp32; convolutions run in bf16 where the CPU has the
    instructions) with channels_last tensors, which is what oneDNN's fast bf16 kernels want.

    Args:
        network: from :func:`yolo_batch.ultralytics_adapter.inference_network`.
        precision: fp32, fp16 (the network's weights are fp16) or bf16.
    """

    name = "torch"

    def __init__(self, network: ultralytics_adapter.InferenceNetwork, precision: str) -> None:
        if precision == "fp16" and not network.half:
            raise ValueError("fp16 needs a network loaded with half=True")
        self.network = network
        self.precision = precision
        self.device = network.device
        self.pin_memory = network.device.type == "cuda"
        self._local = threading.local()
        self._owner: threading.Thread | None = None  # the thread running network.module itself
        self._template: Any = None  # a copy never run, so never caught mid-update: other threads copy it
        self._copy_lock = threading.Lock()

    @classmethod
    def load(cls, model: str, device: Any, precision: str, channels_last: bool | None = None
             ) -> tuple[TorchRuntime, ModelInfo]:
        """Load ``model`` (yaml name or local .pt) through the adapter (never downloading).

        Raises:
            InputError: unknown or unreadable model.
        """
        yolo = ultralytics_adapter.load_model(model)
        if precision == "bf16" and channels_last is None:
            channels_last = True
        network = ultralytics_adapter.inference_network(yolo, device, precision == "fp16", channels_last)
        if precision == "bf16":
            ultralytics_adapter.keep_ends_fp32(network.module)
        return cls(network, precision), ModelInfo(network.names, network.stride, network.end2end)

    def __call__(self, host: Any) -> Any:
        import torch

        net = self.network
        with torch.inference_mode():
            x = normalised(host, net.device, torch.float16 if net.half else torch.float32, net.channels_last)
            if self.precision == "bf16":
                with torch.autocast(device_type=net.device.type, dtype=torch.bfloat16):
                    raw = first_output(self.thread_module()(x))
                return raw.float()  # NMS and box scaling in fp32
            return first_output(self.thread_module()(x))

    def thread_module(self) -> Any:
        """The network for the calling thread.

        Ultralytics' Detect head caches the anchors of the last input shape in module attributes
        (``Detect.shape``, ``anchors``, ``strides``), so two threads running one module on different shapes
        can decode boxes with each other's anchors. One thread runs the loaded module; every other thread
        alive at the same time gets its own copy, made from a template copied before the first forward pass
        (weights are small next to a batch's activations).
        """
        module = getattr(self._local, "module", None)
        if module is None:
            with self._copy_lock:
                if self._template is None:
                    self._template = copy.deepcopy(self.network.module)
                if self._owner is None or not self._owner.is_alive():
                    self._owner = threading.current_thread()
                    module = self.network.module
                else:
                    module = copy.deepcopy(self._template)
            self._local.module = module
        return module

    def release(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
