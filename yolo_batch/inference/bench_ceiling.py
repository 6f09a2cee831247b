"""The forward-only ceiling of ``bench infer``: the runtime alone on inputs letterboxed beforehand, spread over
the same streams as our pipeline, in the runtime's own input format (for OpenVINO the exported IR compiled with
our settings, fed float NCHW tensors): the most any pipeline could reach with that runtime.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from yolo_batch.inference.config import InferConfig
from yolo_batch.inference.engine import Engine
from yolo_batch.inference.runtimes.base import normalised


class Ceiling:
    """The runtime alone on inputs built once beforehand: the most any pipeline could reach with it.

    The images are read and letterboxed once; the runtime is opened, warmed up and dropped for each timing, so
    that it is not alive while another method is timed (module docstring).
    """

    def __init__(self, config: InferConfig, device: Any, warm: Any, paths: Sequence[str], batch: int,
                 streams: int, threads: int) -> None:
        import cv2

        self.config, self.device, self.warm, self.batch = config, device, warm, batch
        self.streams, self.threads = streams, threads
        engine = self._open()
        groups: dict[tuple[int, int], list[Any]] = {}
        for path in paths:
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                continue
            pixels, plan = engine.prepare(image)
            groups.setdefault(plan.out, []).append(pixels)
        self.hosts = [engine.collate(images[i:i + batch]) for images in groups.values()
                      for i in range(0, len(images), batch)]
        self.images = sum(int(h.shape[0]) for h in self.hosts)
        del engine
        gc.collect()

    def _open(self) -> Engine:
        return Engine.open(self.config.model, self.device, _choice_of(self.warm), self.config.imgsz, _default_nms(),
                           max_batch=self.batch, streams=self.streams, threads=self.threads,
                           cache=self.config.export_cache)

    def time(self) -> float:
        """Seconds for every batch, spread over ``streams`` threads as our pipeline spreads them."""
        forward, inputs = _forward_only(self._open, self.warm, self.hosts, self.streams, self.threads)
        forward(inputs[0])  # warm-up
        try:
            return _spread(forward, inputs, self.streams)
        finally:
            del forward, inputs
            gc.collect()


def _spread(forward: Callable[[Any], Any], inputs: Sequence[Any], streams: int) -> float:
    """Seconds for ``forward`` over every input, spread over ``streams`` threads."""
    import torch

    def work(batches: Sequence[Any]) -> None:
        with torch.inference_mode():
            for x in batches:
                forward(x)

    shares = [inputs[i::streams] for i in range(streams)]
    workers = [threading.Thread(target=work, args=(share,), name=f"bench-ceiling-{i}")
               for i, share in enumerate(shares[1:], 1)]
    _synchronize()
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    try:
        work(shares[0])
    finally:
        for worker in workers:
            worker.join()
    _synchronize()
    return time.perf_counter() - start


def _forward_only(open_engine: Callable[[], Engine], warm: Any, hosts: Sequence[Any], streams: int, threads: int
                  ) -> tuple[Callable[[Any], Any], list[Any]]:
    """(forward, inputs): the runtime's own forward pass and its inputs in its own format, built beforehand."""
    import torch

    if warm.backend == "openvino":  # the IR compiled without our input conversion: the engine's own is not used
        from yolo_batch.inference.runtimes.openvino import OpenVinoRuntime

        plain = OpenVinoRuntime(Path(warm.export["artefact"]), warm.precision, streams, threads, embed_input=False)
        return plain, [normalised(h, torch.device("cpu"), torch.float32).numpy() for h in hosts]
    runtime = open_engine().runtime
    if warm.backend == "onnxruntime":
        session, name = runtime.session, runtime.input_name  # type: ignore[attr-defined]
        return (lambda x: session.run(None, {name: x})), [normalised(h, torch.device("cpu"), torch.float32).numpy()
                                                           for h in hosts]
    if warm.backend == "tensorrt":
        return runtime, [h.to(runtime.device) for h in hosts]
    net = runtime.network  # type: ignore[attr-defined]
    dtype = torch.float16 if net.half else torch.float32
    inputs = [normalised(h, net.device, dtype, net.channels_last) for h in hosts]
    if runtime.precision == "bf16":
        def forward(x: Any) -> Any:
            with torch.autocast(device_type=net.device.type, dtype=torch.bfloat16):
                return runtime.thread_module()(x)  # type: ignore[attr-defined]

        return forward, inputs
    return (lambda x: runtime.thread_module()(x)), inputs  # type: ignore[attr-defined]


def _choice_of(warm: Any) -> Any:
    from yolo_batch.inference.runtimes.choice import RuntimeChoice

    return RuntimeChoice(**warm.runtime)


def _default_nms() -> Any:
    from yolo_batch.inference.engine import NmsSettings

    return NmsSettings()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
