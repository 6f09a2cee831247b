"""``autobatch.json``: the decision a run started with, the batch schedule, and every batch change since.

The file is the decision's fields at the top level (as ``yolo-batch autobatch --json`` prints them), plus:

* ``schedule``: the phases of ``--batch-schedule`` (``batch``, ``epoch``), empty without one;
* ``events``: one :class:`~yolo_batch.training.batch_change.BatchEvent` per change (OOM recovery, schedule phase);
* ``trainer_accumulate``: the accumulation the trainer set up before the first epoch;
* ``stopped``: the line training stopped with when it could not recover (null otherwise);
* ``autobatch_limit``: with ``--batch-schedule auto``, the AutoBatch decision the schedule grows toward (the
  top-level decision is then the first phase's).

It is written by the training process (rank 0 of a multi-GPU run only) before the first epoch and after every
change, atomically (:func:`yolo_batch.core.files.write_json`), so a reader sees the last complete version. The
process that started a multi-GPU run reads it back to learn what the workers did.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_batch.core.files import write_json
from yolo_batch.training.batch_change import BatchEvent
from yolo_batch.training.decision import AutoBatchDecision
from yolo_batch.training.schedule import Phase

DECISION_FILE = "autobatch.json"


@dataclass(frozen=True)
class RunRecord:
    """What ``autobatch.json`` holds."""

    decision: AutoBatchDecision
    schedule: tuple[Phase, ...] = ()
    events: tuple[BatchEvent, ...] = ()
    trainer_accumulate: int | None = None
    stopped: str | None = None
    autobatch_limit: AutoBatchDecision | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.decision.to_dict(), "schedule": [dataclasses.asdict(p) for p in self.schedule],
                "events": [dataclasses.asdict(e) for e in self.events],
                "trainer_accumulate": self.trainer_accumulate, "stopped": self.stopped,
                "autobatch_limit": self.autobatch_limit.to_dict() if self.autobatch_limit is not None else None}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        return cls(
            decision=AutoBatchDecision.from_dict(data),
            schedule=tuple(Phase(**p) for p in data.get("schedule", ())),
            events=tuple(BatchEvent.from_dict(e) for e in data.get("events", ())),
            trainer_accumulate=data.get("trainer_accumulate"),
            stopped=data.get("stopped"),
            autobatch_limit=AutoBatchDecision.from_dict(data["autobatch_limit"]) if data.get("autobatch_limit")
            else None,
        )

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def final_batch(self) -> int:
        """The training batch per device the run ended with."""
        train = [e for e in self.events if e.phase == "train"]
        return train[-1].new_batch if train else self.decision.batch

    @property
    def final_accumulate(self) -> int:
        """The accumulation the run ended with."""
        return self.events[-1].accumulate if self.events else (self.trainer_accumulate or self.decision.accumulate)


class RecordWriter:
    """Writes ``autobatch.json`` into a run folder: the record of the run as it stands (picklable, for DDP workers)."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def __call__(self, save_dir: str | Path, **changes: Any) -> Path:
        """Update the record with ``changes`` (events, trainer_accumulate, stopped) and write it."""
        self.record = dataclasses.replace(self.record, **changes)
        return self.record.save(Path(save_dir) / DECISION_FILE)
