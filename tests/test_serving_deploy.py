"""deploy/: the Dockerfile and compose.yaml checked with parsers, and the image's entrypoint command run from the
project's wheel.

No Docker engine exists on these machines, so the image is never built here. What the test runs instead is
the same command the container runs (ENTRYPOINT + CMD, with ENV applied) from the project **installed as a
wheel**, in a fresh virtual environment: the wheel is built from a copy of the sources (``pip wheel
--no-deps``) and installed with ``--no-deps`` into a new venv, so a module missing from the package list, a
wrong console-script name or a file read from the work tree fails here as it would in the image. Building a
venv with torch and Ultralytics takes minutes and a download, so the third-party dependencies are the main
venv's, reached through a ``.pth`` file that lists its site-packages (it is appended to ``sys.path`` after the
new venv's own, and the main venv's editable-install hook is not run, so ``yolo_batch`` comes from the wheel;
the test checks that).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomllib
import yaml
from conftest import ROOT
from inference_fixtures import detector  # noqa: F401 (fixture)
from serving_fixtures import free_port, until, wait_for_status

from yolo_batch.serving.config import SETTINGS, TOKEN_ENV

DEPLOY = ROOT / "deploy"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # as written, continuation lines joined

    def exec_form(self) -> list[str] | None:
        """The JSON array form (``["a", "b"]``), or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{self.keyword}: not a JSON array of strings: {text}")
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments and blank lines dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1]:]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((DEPLOY / "Dockerfile").read_text())


def test_the_parser_joins_continuations_and_skips_comments():
    parsed = parse_dockerfile('# c\nFROM a AS b\nRUN x \\\n    # inner\n    && y\nCMD ["a", "b"]\n')
    assert [(i.keyword, i.args) for i in parsed] == [("FROM", "a AS b"), ("RUN", "x && y"), ("CMD", '["a", "b"]')]
    assert parsed[2].exec_form() == ["a", "b"]


def test_dockerfile_builds_a_wheel_and_installs_it_on_a_cuda_pytorch_base(dockerfile):
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in dockerfile if i.keyword == "ARG"}
    froms = [i.args for i in dockerfile if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build the wheel, then install it"
    base = froms[-1].split()[0]
    base = args.get(base.strip("${}"), base) if base.startswith("${") else base
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and "cuda" in tag and tag.endswith("-runtime"), base
    build_runs = " ".join(i.args for i in dockerfile[:dockerfile.index(next(i for i in dockerfile
                                                                              if i.args == froms[-1]))]
                          if i.keyword == "RUN")
    assert "pip wheel" in build_runs and "--no-deps" in build_runs
    final_runs = [i.args for i in final_stage(dockerfile) if i.keyword == "RUN"]
    assert any("pip install" in r and ".whl" in r for r in final_runs)
    for ins in dockerfile:
        if ins.keyword == "COPY" and "--from" not in ins.args:
            for source in ins.args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"


def test_dockerfile_runtime_user_entrypoint_healthcheck_volumes(dockerfile):
    stage = final_stage(dockerfile)
    users = [i.args for i in stage if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    entrypoint = [i for i in stage if i.keyword == "ENTRYPOINT"][-1].exec_form()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["yolo-batch"] and scripts["yolo-batch"] == "yolo_batch.cli:main"
    command = [i for i in stage if i.keyword == "CMD"][-1].exec_form()
    assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
    healthcheck = [i for i in stage if i.keyword == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "CMD" in healthcheck[0].args and "/healthz" in healthcheck[0].args
    volumes = json.loads([i for i in stage if i.keyword == "VOLUME"][-1].args)
    assert {"/models", "/data/in", "/data/out"} <= set(volumes)
    env = env_of(stage)
    assert env["YOLO_OFFLINE"] == "1" and env["YOLO_BATCH_MODEL"].startswith("/models/")
    exposed = [i.args for i in stage if i.keyword == "EXPOSE"]
    assert exposed == [env["YOLO_BATCH_PORT"]]


def test_compose_reserves_a_gpu_restarts_mounts_and_reads_the_token_from_an_env_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    [service] = compose["services"].values()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert service["restart"] == "unless-stopped"
    targets = {re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1] for v in service["volumes"]}  # ${VAR:-default}
    assert {"/models", "/data/in", "/data/out"} <= targets
    assert any(str(p).endswith(":8000:8000") for p in service["ports"])
    assert service["build"]["dockerfile"] == "deploy/Dockerfile" and service["build"]["context"] == ".."
    assert service["env_file"] == ["yolo-batch.env"]
    example = (DEPLOY / "yolo-batch.env.example").read_text()
    assert f"{TOKEN_ENV}=" in example
    assert "deploy/yolo-batch.env" in (ROOT / ".gitignore").read_text()
    grace = float(service["environment"]["YOLO_BATCH_GRACE_S"])
    assert float(service["stop_grace_period"].rstrip("s")) > grace  # Docker's SIGKILL must not cut the drain


def test_deploy_readme_documents_every_setting():
    text = (DEPLOY / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in text, setting.env
    assert f"`{TOKEN_ENV}`" in text


def _build_wheel(tmp: Path) -> Path:
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("yolo_batch", "datasets"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp / "wheels"), str(source)], check=True, timeout=300)
    [wheel] = (tmp / "wheels").glob("yolo_batch-*.whl")
    return wheel


def test_the_image_command_runs_from_the_wheel_in_a_fresh_venv(dockerfile, detector, tmp_path):
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, timeout=300)
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "main_venv_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = subprocess.run([str(python), "-c", "import yolo_batch.serving, yolo_batch_datasets; "
                            "print(yolo_batch.serving.__file__)"], capture_output=True, text=True, cwd=tmp_path,
                           check=True).stdout.strip()
    assert Path(where).is_relative_to(venv_site), f"yolo_batch imported from {where}, not from the wheel"

    stage = final_stage(dockerfile)
    entrypoint = [i for i in stage if i.keyword == "ENTRYPOINT"][-1].exec_form()
    command = [i for i in stage if i.keyword == "CMD"][-1].exec_form()
    command[command.index("--host") + 1] = "127.0.0.1"  # tests listen on loopback only
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_BATCH_")}
    env.update(env_of(stage))
    env.update(YOLO_BATCH_MODEL=str(detector), YOLO_BATCH_PORT=str(port), YOLO_BATCH_DEVICE="cpu",
               YOLO_BATCH_IMGSZ="64", HOME=str(tmp_path), YOLO_CONFIG_DIR=str(tmp_path / "ultralytics"))
    log = tmp_path / "serve.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([str(venv / "bin" / entrypoint[0]), *command], stdout=handle,
                                   stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"

        wait_for_status(f"{url}/healthz", process, log)
        check = next(i for i in stage if i.keyword == "HEALTHCHECK").args
        probe = json.loads(check[check.index("CMD") + 3:].strip())  # the exec form after CMD
        assert probe[0] == "python"
        assert subprocess.run([str(python), *probe[1:]], env=env, timeout=30).returncode == 0
        until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=120, what="ready")
        info = httpx.get(f"{url}/v1/info", timeout=5).json()
        assert info["settings"]["host"] == "127.0.0.1" and info["imgsz"] == 64 and info["settings"]["grace_s"] == 30
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert subprocess.run([str(python), *probe[1:]], env=env, timeout=30,
                          capture_output=True).returncode != 0  # and it fails once the service is gone
