"""One file or folder that produced no result: a line of errors.jsonl (kept light: discovery makes them too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FailureRecord:
    """One file that produced no result, or a folder whose images the run cannot see."""

    path: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "reason": self.reason}
