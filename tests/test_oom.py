from __future__ import annotations

import pytest
import torch

from yolo_batch.core.oom import is_oom_error


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
        (MemoryError(), True),
        (RuntimeError("shape '[2, 3]' is invalid for input of size 7"), False),
        (ValueError("out of memory"), False),  # not a runtime failure: a bug, re-raised by callers
        (KeyError("bboxes"), False),
    ],
)
def test_is_oom_error(exc, expected):
    assert is_oom_error(exc) is expected
