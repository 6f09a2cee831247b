"""bf16 autocast for the network body with its two ends, the stem and the detection head, kept in fp32.

Under ``torch.autocast`` every convolution runs in bf16. bf16 keeps 8 significant bits, which costs accuracy
at the two ends of a detector and almost nothing in between:

* the head: the DFL expectation that turns 16 bins into a box edge (values up to 15 grid cells, times the
  stride) is rounded to about 1/16 of a cell, up to 2 px at stride 32, and close class logits swap order;
* the stem: the image enters as pixel / 255, which bf16 cannot hold exactly (a step of 1/255 is below its
  resolution above 0.5), so the first convolution sees every pixel off by up to 0.2 %. Measured on the BCCD
  model (16 images at 320): keeping the stem in fp32 cut the error of the boxes and class scores against fp32
  by 2.6x, at no speed cost we could measure (the stem has 3 input channels; docs/benchmarks.md).

The body, where nearly all the arithmetic is, stays in bf16.
"""

from __future__ import annotations

from typing import Any


def keep_ends_fp32(module: Any) -> Any:
    """Run the first layer (the stem) and the last (the Detect head) of an Ultralytics ``DetectionModel``
    outside autocast, in fp32. Returns ``module`` (changed in place)."""
    layers = module.model
    for index in (0, len(layers) - 1):
        layers[index] = _fp32_layer(layers[index])
    return module


def _fp32_layer(layer: Any) -> Any:
    """``layer`` wrapped to run in fp32 outside autocast; the wrapper keeps the attributes Ultralytics' forward
    loop reads (``f``, ``i``, ``type``) and hands every other attribute to the layer, so the model reads as
    before."""
    import torch

    class Fp32Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer
            for name in ("f", "i", "type"):  # read by DetectionModel's forward loop ("type" shadows Module.type)
                setattr(self, name, getattr(layer, name))

        def forward(self, x: Any) -> Any:  # the head takes one feature map per stride, the stem the image
            inputs = [t.float() for t in x] if isinstance(x, list) else x.float()
            device = (inputs[0] if isinstance(inputs, list) else inputs).device.type
            with torch.autocast(device_type=device, enabled=False):
                return self.layer(inputs)

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["layer"], name)

    return Fp32Layer()
