from __future__ import annotations

import pytest
import torch

from yolo_batch.core.oom import is_oom_error

AcceleratorError = getattr(torch, "AcceleratorError", RuntimeError)  # torch >= 2.8 raises CUDA errors as this


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul( ... )`"), True),
        # cuDNN fails this way when it cannot allocate its workspace under memory pressure (Ultralytics treats
        # these three as memory errors in its own first-epoch retry)
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        (RuntimeError("GET was unable to find an engine to execute this computation"), True),
        (RuntimeError("FIND was unable to find an engine to execute this computation"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                      "non-contiguous input."), True),
        (MemoryError(), True),
        (RuntimeError("shape '[2, 3]' is invalid for input of size 7"), False),
        (RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"), False),
        (RuntimeError("CUBLAS_STATUS_INVALID_VALUE when calling cublasGemmEx"), False),
        (ValueError("out of memory"), False),  # not a runtime failure: a bug, re-raised by callers
        (KeyError("bboxes"), False),
    ],
)
def test_is_oom_error(exc, expected):
    assert is_oom_error(exc) is expected
