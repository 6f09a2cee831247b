"""What the trainer will do, asked of Ultralytics itself: its defaults, its model stride, its determinism switch and
its AMP check, so the AutoBatch probe trains under the trainer's settings (:mod:`yolo_batch.training.settings`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from yolo_batch.ultralytics_adapter.session import offline, quiet

_DETERMINISM_ENV = ("CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")


def default_train_args(keys: Sequence[str]) -> dict[str, Any]:
    """Ultralytics' default values for the train arguments ``keys`` (``DEFAULT_CFG_DICT``)."""
    with offline():
        from ultralytics.utils import DEFAULT_CFG_DICT

        return {k: DEFAULT_CFG_DICT.get(k) for k in keys}


def model_stride(model: Any) -> int:
    """The grid size the trainer rounds image sizes to (``max(stride)``, at least 32), for a loaded YOLO model."""
    stride = getattr(model.model, "stride", None)
    return max(int(stride.max()) if stride is not None else 32, 32)


@contextlib.contextmanager
def determinism(deterministic: bool, seed: int = 0) -> Iterator[None]:
    """Ultralytics' ``init_seeds(seed, deterministic)`` for the block, as the trainer applies it when it is built:
    deterministic algorithms, deterministic cuDNN and ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS reads it once per process,
    at its first use, so it must be set before any step runs). Everything it changed is restored after, also on
    error.
    """
    import random

    import numpy
    import torch

    saved_env = {k: os.environ.get(k) for k in _DETERMINISM_ENV}
    deterministic_utils: Any = torch.utils.deterministic  # its one setting is a module attribute typeshed lacks
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, deterministic_utils.fill_uninitialized_memory)
    rng = (random.getstate(), numpy.random.get_state(), torch.random.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)  # init_seeds reseeds them all
    try:
        with offline():
            from ultralytics.utils.torch_utils import init_seeds

            init_seeds(seed, deterministic=deterministic)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic = saved[2]
        deterministic_utils.fill_uninitialized_memory = saved[3]
        random.setstate(rng[0])
        numpy.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def amp_check(module: Any) -> bool:
    """Ultralytics' AMP check (``check_amp``, offline) on ``module`` where it sits: whether the trainer keeps fp16
    autocast on this GPU. False on CPU, as in the trainer."""
    with offline(), quiet():
        from ultralytics.engine import trainer
        from ultralytics.utils import callbacks

        backup = callbacks.default_callbacks.copy()  # the check resets them, as the trainer knows
        try:
            return bool(trainer.check_amp(module))
        finally:
            callbacks.default_callbacks = backup
