"""One predicate: is this exception the device running out of memory?

Kept apart from any retry loop (as Accelerate's ``should_reduce_batch_size`` and Lightning's
``is_oom_error``): callers decide what to do, and every other error is re-raised by them.
"""

from __future__ import annotations

# Allocation failures surface under several names depending on which library hit them first.
_OOM_MESSAGES = (
    "out of memory",
    "cuda error: out of memory",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
    "cudnn error: cudnn_status_not_supported",  # cuDNN reports this when its workspace cannot be allocated
    # cuDNN also fails these two ways when no memory is left for its workspace or its engines' plans; Ultralytics'
    # own first-epoch retry counts them as memory errors too
    "cudnn_status_internal_error",
    "unable to find an engine",
    "failed to allocate memory",
)


def is_oom_error(exc: BaseException) -> bool:
    """Return True when ``exc`` means the accelerator ran out of memory.

    ``torch.cuda.OutOfMemoryError`` is checked first; a message match covers older torch builds,
    cuDNN/cuBLAS allocation failures and errors re-raised as plain ``RuntimeError``.
    """
    if isinstance(exc, _torch_oom_types()):
        return True
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return any(text in message for text in _OOM_MESSAGES)


def _torch_oom_types() -> tuple[type[BaseException], ...]:
    try:
        import torch
    except ImportError:  # the predicate stays usable without torch (NVML-only tools)
        return ()
    return (torch.cuda.OutOfMemoryError,)
