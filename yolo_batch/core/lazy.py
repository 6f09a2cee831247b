"""Package ``__init__``s that import their modules on first use (PEP 562), so ``import yolo_batch`` stays light.

``yolo-batch --help`` must start in well under a second; torch, Ultralytics, OpenCV and FastAPI take seconds
to import and are loaded only by the code that needs them. A package declares its public names once, as
imports under ``if TYPE_CHECKING:`` (so type checkers and readers see them), and hands its name to
:func:`lazy_exports`, which reads those imports from the package's source and serves each name on first use::

    if TYPE_CHECKING:
        from yolo_batch.inference.engine import Engine

    __getattr__, __dir__ = lazy_exports(__name__)
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, serving the names its ``if TYPE_CHECKING:`` block imports."""
    exports = declared_exports(Path(str(sys.modules[package].__file__)))

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, original = exports[name]
        value = getattr(importlib.import_module(module), original)
        setattr(sys.modules[package], name, value)  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__


def declared_exports(init_file: Path) -> dict[str, tuple[str, str]]:
    """``{public name: (module, name there)}`` from the ``from X import Y [as Z]`` lines under ``if TYPE_CHECKING:``."""
    exports: dict[str, tuple[str, str]] = {}
    for node in ast.parse(init_file.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module:
                    for alias in statement.names:
                        exports[alias.asname or alias.name] = (statement.module, alias.name)
    return exports
