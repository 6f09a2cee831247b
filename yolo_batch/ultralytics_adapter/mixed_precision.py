"""bf16 autocast for the network body with the detection head kept in fp32.

Under ``torch.autocast`` every convolution runs in bf16, the head's too. bf16 keeps 8 significant bits: the DFL
expectation that turns 16 bins into a box edge (values up to 15 grid cells, times the stride) is rounded to
about 1/16 of a cell, up to 2 px at stride 32, and the class logits of a box with close scores can swap order.
Keeping the head (box and class branches, DFL, anchor decoding) in fp32 removes both; the body, where nearly
all the arithmetic is, stays in bf16.
"""

from __future__ import annotations

from typing import Any


def keep_head_fp32(module: Any) -> Any:
    """Wrap the last layer of an Ultralytics ``DetectionModel`` (its Detect head) to run outside autocast.

    The wrapper keeps the attributes Ultralytics' forward loop reads (``f``, ``i``, ``type``) and hands every
    other attribute to the head, so the model reads as before. Returns ``module`` (changed in place).
    """
    import torch

    head = module.model[-1]

    class Fp32Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head
            for name in ("f", "i", "type"):  # read by DetectionModel's forward loop ("type" shadows Module.type)
                setattr(self, name, getattr(head, name))

        def forward(self, x: list[Any]) -> Any:  # the Detect head takes one feature map per stride
            inputs = [t.float() for t in x]
            with torch.autocast(device_type=inputs[0].device.type, enabled=False):
                return self.head(inputs)

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["head"], name)

    module.model[-1] = Fp32Head()
    return module
