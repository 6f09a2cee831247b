"""The shared-GPU stress benchmark's parts that run anywhere: the co-tenant process driven over its pipe (host memory
stands in for the GPU's), its trigger, the plan of its allocations, and the report's tally."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from yolo_batch.training.cotenant import CHUNK_BYTES, CoTenant, CoTenantError, TakeMemoryAt, plan_take
from yolo_batch.training.stress import StressReport, StressRun

MIB = 1 << 20


@pytest.mark.parametrize(
    ("free", "share", "chunk", "plan"),
    [
        (1000, 0.9, 256, [256, 256, 256, 132]),
        (1000, 1.0, 250, [250, 250, 250, 250]),
        (100, 0.5, 256, [50]),
        (0, 0.9, 256, []),
    ],
)
def test_plan_take(free, share, chunk, plan):
    assert plan_take(free, share, chunk) == plan


@pytest.mark.parametrize(("free", "share"), [(100, 0.0), (100, 1.5), (-1, 0.5)])
def test_plan_take_rejects_nonsense(free, share):
    with pytest.raises(ValueError):
        plan_take(free, share)


def test_the_co_tenant_takes_its_share_holds_it_and_gives_it_back():
    with CoTenant("cpu", share=0.5, free_bytes=600 * MIB) as cotenant:
        assert cotenant.taken_bytes == 0
        assert cotenant.take() == 300 * MIB
        assert cotenant.taken_bytes == 300 * MIB
        cotenant.release()
        assert cotenant.taken_bytes == 0
        assert cotenant.take() == 300 * MIB
    assert [e.what for e in cotenant.events] == ["ready", "took", "released", "took", "stopped"]
    assert [e.bytes for e in cotenant.events if e.what == "took"] == [300 * MIB, 300 * MIB]
    assert cotenant.taken_bytes == 0  # its memory went with the process
    times = [e.seconds for e in cotenant.events]
    assert times == sorted(times)
    cotenant.stop()  # a second stop changes nothing
    assert [e.what for e in cotenant.events].count("stopped") == 1


def test_a_stopped_co_tenant_says_so():
    cotenant = CoTenant("cpu", share=0.5, free_bytes=CHUNK_BYTES)
    cotenant.start()
    cotenant.stop()
    with pytest.raises(CoTenantError, match="not running"):
        cotenant.take()


class Recorder:
    def __init__(self):
        self.calls = 0

    def take(self):
        self.calls += 1
        return 123


def test_the_trigger_takes_once_at_the_start_of_its_epoch():
    recorder = Recorder()
    trigger = TakeMemoryAt(recorder, epoch=2)  # type: ignore[arg-type]
    for epoch in (0, 1, 1, 2):  # Ultralytics counts epochs from 0; a recovery may start epoch 2 (index 1) again
        trigger(SimpleNamespace(epoch=epoch))
    assert recorder.calls == 1 and trigger.taken == 123
    assert trigger.event == "on_train_epoch_start"
    with pytest.raises(ValueError, match="1-based"):
        TakeMemoryAt(recorder, epoch=0)  # type: ignore[arg-type]


def run(method, finished, error=None):
    return StressRun(method=method, run=0, finished=finished, seconds=1.0, cotenant_bytes=70 << 30, error=error,
                     oom=error is not None)


def test_the_report_counts_runs_finished_over_runs_started():
    report = StressReport(device="GPU", model="yolo11n.yaml", imgsz=640, fraction=0.9, share=0.9, at_epoch=2, runs=(
        run("yolo-batch", True), run("ultralytics", False, "CUDA out of memory. Tried to allocate 2.00 GiB"),
        run("yolo-batch", True), run("ultralytics", True),
    ))
    assert report.tally() == {"yolo-batch": {"started": 2, "finished": 2}, "ultralytics": {"started": 2, "finished": 1}}
    assert report.ratios() == {"yolo-batch_finished_over_started": 1.0, "ultralytics_finished_over_started": 0.5}
    assert report.to_dict()["tally"]["ultralytics"]["finished"] == 1
    rows = [list(r) for r in zip(*[c._cells for c in report.table().columns])]
    assert rows[1][:4] == ["ultralytics", "2", "1", "0.50"] and "CUDA out of memory" in rows[1][4]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: the benchmark would run")
def test_bench_autobatch_shared_gpu_without_a_gpu_is_one_line_and_exit_0():
    from yolo_batch.cli import main

    result = CliRunner().invoke(main, ["bench", "autobatch", "--shared-gpu", "--runs", "1"])
    assert result.exit_code == 0
    assert result.output.strip().splitlines() == [
        "no CUDA GPU on this machine: the shared-GPU stress benchmark needs one (nothing measured)"]
    bad = CliRunner().invoke(main, ["bench", "autobatch", "--shared-gpu", "--cotenant-epoch", "1"])
    assert bad.exit_code == 2 and "co-tenant epoch must be an integer >= 2" in bad.output
