"""``make gpu-check``: every GPU path in one prepared run of at most 8 minutes, into one report.

``python -m yolo_batch.gpu_check [--out runs/gpu-check]`` runs, one after the other, each in its own process and
within what is left of the budget: ``pytest -m gpu``, ``bench autobatch``, ``bench autobatch --shared-gpu`` (one
run per method), ``bench infer`` and ``bench serve``; then writes ``report.json`` (everything, machine readable) and
``report.md`` (a readable summary) into the output folder and prints the summary. On a machine without a CUDA GPU
it says so in one line and exits 0 without running anything.

The benchmarks train and infer on a copy of ``../shared/datasets/bccd`` where the project has one beside it
(Ultralytics writes label caches), else on the built-in synthetic set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BUDGET_S = 480  # the whole check, on one GPU
NO_GPU = "no CUDA GPU on this machine: make gpu-check needs one (nothing run)"
ROOT = Path(__file__).resolve().parents[1]
TAIL = 4000  # characters of a step's output kept in the report


@dataclass(frozen=True)
class Step:
    """One command of the check. ``kind``: "pytest" (a JUnit file is read) or "json" (its stdout is JSON)."""

    name: str
    argv: tuple[str, ...]
    timeout_s: int
    kind: str = "json"
    min_s: int = 30  # not started with less left than this: it could not finish


@dataclass(frozen=True)
class StepResult:
    name: str
    command: str
    returncode: int | None  # None: not run
    seconds: float
    timed_out: bool = False
    skipped: str | None = None
    data: dict[str, Any] | None = None  # the JSON a bench printed, or pytest's counts
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.timed_out and self.returncode == 0


Runner = Callable[..., subprocess.CompletedProcess[str]]


def default_steps(out: Path, data_yaml: Path, images: Path) -> list[Step]:
    """The check's commands, with timeouts that add up to :data:`BUDGET_S`."""
    cli = (sys.executable, "-m", "yolo_batch.cli")
    data = ("--data", str(data_yaml), "--imgsz", "320")
    return [
        Step("pytest -m gpu", (sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                               f"--junitxml={out / 'pytest.xml'}", str(ROOT / "tests")), 240, kind="pytest", min_s=60),
        Step("bench autobatch", (*cli, "bench", "autobatch", *data, "--epochs", "1", "--no-cache", "--json"), 80),
        Step("bench autobatch --shared-gpu", (*cli, "bench", "autobatch", "--shared-gpu", "--runs", "1", *data,
                                              "--json"), 80, min_s=60),
        Step("bench infer", (*cli, "bench", "infer", str(images), "--batch", "auto", "--json"), 40),
        Step("bench serve", (*cli, "bench", "serve", str(images), "--requests", "200", "--json"), 40),
    ]


def run_steps(steps: Sequence[Step], budget_s: float = BUDGET_S, *, runner: Runner = subprocess.run,
              clock: Callable[[], float] = time.monotonic) -> list[StepResult]:
    """Run ``steps`` in order, each within its timeout and what is left of ``budget_s``."""
    deadline = clock() + budget_s
    results = []
    for step in steps:
        left = deadline - clock()
        if left < step.min_s:
            results.append(StepResult(step.name, " ".join(step.argv), None, 0.0,
                                      skipped=f"{left:.0f} s left of the {budget_s:.0f} s budget, needs {step.min_s}"))
            continue
        results.append(run_step(step, min(step.timeout_s, left), runner=runner, clock=clock))
    return results


def run_step(step: Step, timeout_s: float, *, runner: Runner = subprocess.run,
             clock: Callable[[], float] = time.monotonic) -> StepResult:
    """One step in its own process; its JSON (or JUnit counts) and the tail of its output."""
    start = clock()
    command = " ".join(step.argv)
    try:
        done = runner(list(step.argv), capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        tail = _text(exc.stdout) + _text(exc.stderr)
        return StepResult(step.name, command, None, clock() - start, timed_out=True, output_tail=tail[-TAIL:])
    data = junit_counts(_junit_path(step)) if step.kind == "pytest" else _json(done.stdout)
    tail = (done.stdout if data is None or step.kind == "pytest" else "") + done.stderr
    return StepResult(step.name, command, done.returncode, clock() - start, data=data, output_tail=tail[-TAIL:])


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def _json(stdout: str) -> dict[str, Any] | None:
    try:
        value = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _junit_path(step: Step) -> Path | None:
    flag = next((a for a in step.argv if a.startswith("--junitxml=")), None)
    return Path(flag.split("=", 1)[1]) if flag else None


def junit_counts(path: Path | None) -> dict[str, Any] | None:
    """Counts and failures from a pytest JUnit file (None if pytest wrote none)."""
    if path is None or not path.is_file():
        return None
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed, skipped = [], []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = next((e for e in (case.find("failure"), case.find("error")) if e is not None), None)
        skip = case.find("skipped")
        if problem is not None:
            failed.append({"test": name, "message": ((problem.get("message") or "").splitlines() or [""])[0][:300]})
        elif skip is not None:
            skipped.append({"test": name, "reason": skip.get("message", "")})
    return {"tests": len(cases), "passed": len(cases) - len(failed) - len(skipped), "failed": failed,
            "skipped": skipped}


def assemble_report(results: Sequence[StepResult], machine: dict[str, Any], started: str) -> dict[str, Any]:
    """The report: the machine, each step as run, and one verdict per step and overall."""
    steps = []
    for r in results:
        steps.append({**asdict(r), "ok": r.ok, "verdict": verdict(r)})
    return {"started": started, "machine": machine, "budget_s": BUDGET_S,
            "seconds": round(sum(r.seconds for r in results), 1), "ok": all(r.ok for r in results), "steps": steps}


def verdict(result: StepResult) -> str:
    """One line per step: what it measured or why it did not finish."""
    if result.skipped is not None:
        return f"not run: {result.skipped}"
    if result.timed_out:
        return f"timed out after {result.seconds:.0f} s"
    data = result.data or {}
    if result.name.startswith("pytest"):
        if not data:
            return f"pytest wrote no results (exit {result.returncode})"
        line = f"{data['passed']} passed, {len(data['failed'])} failed, {len(data['skipped'])} skipped"
        return line + "".join(f"; FAILED {f['test']}: {f['message']}" for f in data["failed"])
    if result.returncode != 0:
        lines = [x for x in result.output_tail.splitlines() if x.strip()]
        return f"exit {result.returncode}: {lines[-1] if lines else 'no output'}"
    if data.get("skipped"):
        return str(data["skipped"])
    return _figures(result.name, data)


def _figures(name: str, data: dict[str, Any]) -> str:
    ratios = ", ".join(f"{k} {v:.3g}" for k, v in (data.get("ratios") or {}).items())
    if "tally" in data:  # the shared-GPU stress mode
        counts = "; ".join(f"{m} {t['finished']}/{t['started']} finished" for m, t in data["tally"].items())
        return counts
    if "rows" in data:  # bench autobatch
        rows = "; ".join(f"{r['method']} batch {r['batch']}{' OOM' if r['oom'] else ''}" for r in data["rows"])
        return f"{rows}; {ratios}" if ratios else rows
    if "images_per_s" in data and isinstance(data["images_per_s"], dict):  # bench infer
        return f"img/s {data['images_per_s']}; {ratios}"
    if "images_per_s" in data:  # bench serve
        p99 = (data.get("latency_ms") or {}).get("p99")
        return (f"{data['images_per_s']} img/s at max batch {data.get('max_batch')}, "
                f"{data.get('ratio_to_offline')} of offline infer, p99 {p99} ms")
    return ratios or f"{name}: done"


def summary_text(report: dict[str, Any]) -> str:
    """The readable summary (report.md)."""
    machine = report["machine"]
    lines = [f"# make gpu-check, {report['started']}", "",
             f"- machine: {machine.get('gpu')} (driver {machine.get('driver')}), {machine.get('host')}",
             f"- versions: yolo-batch {machine.get('yolo_batch')} ({machine.get('commit')}), torch "
             f"{machine.get('torch')}, ultralytics {machine.get('ultralytics')}",
             f"- {report['seconds']:.0f} s of the {report['budget_s']} s budget; "
             f"{'all steps passed' if report['ok'] else 'NOT all steps passed'}", "",
             "| step | result | seconds | command |", "|---|---|---|---|"]
    for step in report["steps"]:
        mark = "" if step["skipped"] is not None else "ok: " if step["ok"] else "FAIL: "
        result = mark + step["verdict"]
        lines.append(f"| {step['name']} | {result} | {step['seconds']:.0f} | `{step['command']}` |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    """What ran the check: GPU, driver, library versions, the commit."""
    import torch

    from yolo_batch import __version__
    from yolo_batch.core.nvml import NvmlUnavailable, read_gpus
    from yolo_batch.ultralytics_adapter import versions

    try:
        driver = read_gpus([0])[0].driver
    except NvmlUnavailable as exc:
        driver = f"unknown ({exc})"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"host": platform.node(), "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "driver": driver, "yolo_batch": __version__, "commit": commit.stdout.strip() or None, **versions()}


def prepare_data(out: Path) -> tuple[Path, Path]:
    """A private copy of the real bccd set (or the synthetic set): its data yaml and its validation images."""
    shared = ROOT.parent / "shared" / "datasets" / "bccd"
    target = out / "data" / "bccd"
    if (shared / "data.yaml").is_file():
        if not target.exists():
            shutil.copytree(shared, target, ignore=shutil.ignore_patterns("*.cache"))
        return target / "data.yaml", target / "images" / "val"
    from yolo_batch_datasets import make_dataset

    yaml_path = out / "data" / "shapes" / "data.yaml"
    if not yaml_path.is_file():
        yaml_path = make_dataset("shapes", yaml_path.parent, overwrite=True)
    return yaml_path, yaml_path.parent / "images" / "val"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolo_batch.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    data_yaml, images = prepare_data(args.out)
    results = run_steps(default_steps(args.out, data_yaml, images))
    report = assemble_report(results, machine_info(), started)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = summary_text(report)
    (args.out / "report.md").write_text(summary)
    print(summary + f"\nreport: {args.out / 'report.json'} and report.md")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
