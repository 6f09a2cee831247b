"""Third-party packages that would report to their makers over the network, imported with that kept off.

OpenVINO sends a usage event to Google Analytics when it is imported and again at every model conversion (its
``openvino_telemetry`` package, outside CI, unless the user has opted out), and yolo-batch never reaches the network on
its own. OpenVINO's modules fall back to their own no-op stub when ``openvino_telemetry`` cannot be imported, and they
bind it once, at import: so ``openvino`` is imported here with that package hidden for the duration of the import
only. Nothing else is changed; a process that imported OpenVINO before us keeps what it had.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

TELEMETRY = "openvino_telemetry"


def import_openvino() -> ModuleType:
    """``openvino`` (imported once, with its telemetry kept off; later calls return the same module).

    Raises:
        ImportError: OpenVINO is not installed.
    """
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    hidden = sys.modules.get(TELEMETRY)
    sys.modules[TELEMETRY] = None  # type: ignore[assignment]  # import of it raises ImportError: the stub is used
    try:
        return importlib.import_module("openvino")
    finally:
        if hidden is None:
            del sys.modules[TELEMETRY]
        else:
            sys.modules[TELEMETRY] = hidden
