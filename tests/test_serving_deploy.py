"""deploy/: the Dockerfile, compose files, .dockerignore, pins and smoke test checked statically, and the image's
entrypoint command run from the project's wheel.

The image itself is built and run by ``deploy/smoke.sh`` (``make docker-test``; CI runs it after ``make test``),
which needs root and a Docker engine. These tests need neither, so they run everywhere, and they keep the files
consistent with each other: the Dockerfile with .dockerignore and the pins, the compose files with the
Dockerfile and the service's settings, deploy/README.md's step-by-step commands with the smoke test.

What the wheel test runs is the same command the container runs (ENTRYPOINT + CMD, with ENV applied) from the
project **installed as a wheel**, in a fresh virtual environment: the wheel is built from a copy of the sources
(``pip wheel --no-deps``) and installed with ``--no-deps`` into a new venv, so a module missing from the package
list, a wrong console-script name or a file read from the work tree fails here as it would in the image. The
third-party dependencies are the main venv's, reached through a ``.pth`` file that lists its site-packages (it
is appended to ``sys.path`` after the new venv's own, and the main venv's editable-install hook is not run, so
``yolo_batch`` comes from the wheel; the test checks that).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
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

from yolo_batch.serving.config import SETTINGS, TOKEN_ENV, ServeConfig

DEPLOY = ROOT / "deploy"
DEFAULT_PORT = ServeConfig.__dataclass_fields__["port"].default
BASE_PROVIDED = {"torch", "torchvision"}  # the base image's, never pinned by deploy/constraints.txt

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
    args = arg_defaults(dockerfile)
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


def test_dockerfile_installs_the_pins_in_a_layer_of_their_own_then_the_wheel_with_extras(dockerfile):
    stage = final_stage(dockerfile)
    keywords = [(i.keyword, i.args) for i in stage]
    pins = next(n for n, (k, a) in enumerate(keywords) if k == "RUN" and "-r /etc/yolo-batch/constraints.txt" in a)
    wheel_copy = next(n for n, (k, a) in enumerate(keywords) if k == "COPY" and a.startswith("--from=build"))
    assert pins < wheel_copy, "the pinned dependencies must not be rebuilt with every source change"
    assert ("ARG", 'EXTRAS=""') in keywords[:wheel_copy + 1]
    [wheel] = [a for k, a in keywords if k == "RUN" and ".whl" in a]
    assert "${EXTRAS:+[$EXTRAS]}" in wheel
    assert "-c /etc/yolo-batch/constraints.txt" in wheel and "-c /etc/yolo-batch/constraints-extras.txt" in wheel


def test_dockerfile_runtime_user_entrypoint_healthcheck_volumes(dockerfile):
    stage = final_stage(dockerfile)
    users = [i.args for i in stage if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    [account] = [i.args for i in stage if i.keyword == "RUN" and "useradd" in i.args]
    # uid and gid 10001 both (deploy/README.md: chown -R 10001:10001); --user-group would take any free gid
    assert re.search(r"groupadd [^&]*--gid 10001 yolo", account) and "--user-group" not in account
    assert re.search(r"useradd [^&]*--uid 10001 --gid 10001 ", account)
    entrypoint = [i for i in stage if i.keyword == "ENTRYPOINT"][-1].exec_form()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["yolo-batch"] and scripts["yolo-batch"] == "yolo_batch.cli:main"
    command = [i for i in stage if i.keyword == "CMD"][-1].exec_form()
    assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
    [healthcheck] = [i.args for i in stage if i.keyword == "HEALTHCHECK"]
    assert "CMD" in healthcheck and "/healthz" in healthcheck
    # Docker 20.10 has no --start-interval: (healthy) comes at the first interval after /healthz answers.
    interval = re.search(r"--interval=(\d+)s", healthcheck)
    assert interval and int(interval.group(1)) <= 10 and "--start-period=" in healthcheck
    volumes = json.loads([i for i in stage if i.keyword == "VOLUME"][-1].args)
    assert {"/models", "/data/in", "/data/out"} <= set(volumes)
    env = env_of(stage)
    assert env["YOLO_OFFLINE"] == "1" and env["YOLO_BATCH_MODEL"].startswith("/models/")
    # Ultralytics appends "Ultralytics" itself; the image makes its settings file once, at build time.
    assert not env["YOLO_CONFIG_DIR"].rstrip("/").endswith("Ultralytics")
    assert any('test -f "$YOLO_CONFIG_DIR/Ultralytics/settings.json"' in i.args for i in stage if i.keyword == "RUN")
    exposed = [i.args for i in stage if i.keyword == "EXPOSE"]
    assert exposed == [env["YOLO_BATCH_PORT"]] == [str(DEFAULT_PORT)]


def test_dockerignore_sends_only_what_the_dockerfile_copies(dockerfile):
    patterns = dockerignore()
    assert patterns[0] == "*", "an allowlist: a file added to the tree later stays out"
    copied = {source for ins in dockerfile if ins.keyword == "COPY" and "--from" not in ins.args
              for source in ins.args.split()[:-1]}
    assert copied == {p[1:] for p in patterns if p.startswith("!")}
    for path in copied | {"yolo_batch/cli.py", "yolo_batch/serving/server.py", "datasets/synthetic.py"}:
        assert not ignored(path, patterns), path
    for path in (".git/config", ".venv/bin/python", "deploy/yolo-batch.env", "deploy/.env", "runs/detect/x.csv",
                 "best.pt", "yolo_batch/weights.pt", "yolo_batch/__pycache__/cli.cpython-311.pyc", "tests/test_x.py",
                 "deploy/compose.yaml", ".pytest_cache/v/cache"):
        assert ignored(path, patterns), path


def test_the_matcher_follows_dockers_rules():
    patterns = ["*", "!keep", "keep/**/*.pt", "!keep/**/ok.pt"]
    assert ignored("other/file", patterns) and not ignored("keep/a/b.py", patterns)
    assert ignored("keep/a/b.pt", patterns) and not ignored("keep/a/ok.pt", patterns)


def test_pins_cover_the_dependencies_and_leave_torch_to_the_base():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = pinned(DEPLOY / "constraints.txt")
    extras = pinned(DEPLOY / "constraints-extras.txt")
    torch_pins = pinned(DEPLOY / "local-base" / "torch-constraints.txt")
    needed = {requirement_name(r) for r in project["dependencies"]}
    assert needed - BASE_PROVIDED <= set(pins), "every runtime dependency is pinned"
    assert not BASE_PROVIDED & set(pins), "torch and torchvision come with the base image, whichever it is"
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "dev":
            assert {requirement_name(r) for r in requirements} <= set(pins) | set(extras), extra
    assert set(torch_pins) >= BASE_PROVIDED
    shared = set(pins) & set(torch_pins)
    assert {"numpy", "pillow"} <= shared
    assert {name: pins[name] for name in shared} == {name: torch_pins[name] for name in shared}


def test_the_local_base_is_debian_12_with_torch_on_path_and_the_machines_certificates():
    script = (DEPLOY / "local-base" / "build.sh").read_text()
    assert "set -euo pipefail" in script and "trap " in script
    assert re.search(r"SUITE=bookworm", script) and "mmdebstrap" in script and "python3-venv" in script
    assert "/etc/apt/sources.list.d/*.sources" in script  # the machine's own apt sources
    base = parse_dockerfile((DEPLOY / "local-base" / "Dockerfile").read_text())
    copies = [i.args for i in base if i.keyword == "COPY"]
    assert "certs/ /usr/local/share/ca-certificates/" in copies
    assert any("update-ca-certificates" in i.args for i in base if i.keyword == "RUN")
    env = env_of(base)
    assert env["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt" and env["PATH"].startswith("/opt/venv/bin:")
    [install] = [i.args for i in base if i.keyword == "RUN" and "pip install" in i.args]
    assert "-c /tmp/torch-constraints.txt torch torchvision" in install


def load_compose(name: str) -> dict:
    compose = yaml.safe_load((DEPLOY / name).read_text())
    assert "name" not in compose and "version" not in compose, "Compose 1.28+ (docker-compose 1.29 here) reads it"
    return compose


def test_compose_cpu_is_the_whole_service_without_a_gpu(dockerfile):
    [service] = load_compose("compose.cpu.yaml")["services"].values()
    assert "deploy" not in service and "runtime" not in service
    assert service["restart"] == "unless-stopped"
    targets = {interpolate(v, {}).split(":")[1] for v in service["volumes"]}
    assert {"/models", "/data/in", "/data/out"} <= targets
    assert service["build"]["dockerfile"] == "deploy/Dockerfile" and service["build"]["context"] == ".."
    args = service["build"]["args"]
    assert interpolate(args["PYTORCH_IMAGE"], {}) == arg_defaults(dockerfile)["PYTORCH_IMAGE"]
    assert interpolate(args["PYTORCH_IMAGE"], {"YOLO_BATCH_PYTORCH_IMAGE": "local:1"}) == "local:1"
    assert interpolate(args["EXTRAS"], {}) == "" and interpolate(args["EXTRAS"], {"YOLO_BATCH_EXTRAS": "x"}) == "x"
    [env_file] = service["env_file"]
    assert interpolate(env_file, {}) == "yolo-batch.env"
    assert interpolate(env_file, {"YOLO_BATCH_ENV_FILE": "/e"}) == "/e"
    example = (DEPLOY / "yolo-batch.env.example").read_text()
    assert f"{TOKEN_ENV}=" in example
    assert "deploy/yolo-batch.env" in (ROOT / ".gitignore").read_text()
    grace = float(service["environment"]["YOLO_BATCH_GRACE_S"])
    assert float(service["stop_grace_period"].rstrip("s")) > grace  # Docker's SIGKILL must not cut the drain
    assert interpolate(service["environment"]["YOLO_BATCH_PROFILE"], {}) == "default"  # no FP16 on a CPU


@pytest.mark.parametrize("variables, published", [
    ({}, f"127.0.0.1:{DEFAULT_PORT}:{DEFAULT_PORT}"),
    ({"YOLO_BATCH_PORT": "9000"}, "127.0.0.1:9000:9000"),
    ({"YOLO_BATCH_PORT": "9000", "YOLO_BATCH_PUBLISH": "10.0.0.5"}, "10.0.0.5:9000:9000"),
])
def test_the_published_port_is_the_port_the_service_listens_on(variables, published):
    [service] = load_compose("compose.cpu.yaml")["services"].values()
    [port] = service["ports"]
    assert interpolate(port, variables) == published
    inside = interpolate(str(service["environment"]["YOLO_BATCH_PORT"]), variables)
    assert published.rsplit(":", 1)[1] == inside


def test_compose_gpu_extends_the_cpu_service_with_a_gpu_and_the_inspection_profile():
    [(name, service)] = load_compose("compose.yaml")["services"].items()
    [(cpu_name, _)] = load_compose("compose.cpu.yaml")["services"].items()
    assert service["extends"] == {"file": "compose.cpu.yaml", "service": cpu_name} and name == cpu_name
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert interpolate(service["environment"]["YOLO_BATCH_PROFILE"], {}) == "inspection"
    assert set(service) == {"extends", "deploy", "environment"}, "everything else is declared once, in the CPU file"


def test_deploy_readme_documents_every_setting():
    text = (DEPLOY / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in text, setting.env
    assert f"`{TOKEN_ENV}`" in text


def test_the_smoke_test_runs_the_readmes_step_by_step_commands():
    readme = (DEPLOY / "README.md").read_text()
    steps = readme.split("<!-- smoke.sh runs these -->", 1)[1].split("<!-- end -->", 1)[0]
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", steps, re.S)
                for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(commands) >= 15
    smoke = (DEPLOY / "smoke.sh").read_text().replace('"$DOCKER" ', "docker ").replace('"$COMPOSE" ', "docker-compose ")
    smoke_lines = [line.strip() for line in smoke.splitlines()]
    for command in commands:
        assert any(command in line for line in smoke_lines), f"deploy/smoke.sh does not run: {command}"


def test_ci_runs_the_smoke_test_after_the_readmes_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci.index("make test") < ci.index("make docker-test")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^docker-test:.*\n\tdeploy/smoke\.sh$", makefile, re.M)
    smoke = (DEPLOY / "smoke.sh").read_text()
    assert "set -euo pipefail" in smoke and "trap cleanup EXIT" in smoke
    assert "--mtu 1400" in smoke and "DOCKER=/usr/bin/docker" in smoke


# --- helpers -------------------------------------------------------------------------------------------------------


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return {i.args.split("=", 1)[0]: i.args.split("=", 1)[1].strip('"') for i in instructions
            if i.keyword == "ARG" and "=" in i.args}


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern(pattern: str) -> re.Pattern[str]:
    text = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    return re.compile(text.replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides; '!' keeps."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        if any(_pattern(pattern.lstrip("!")).fullmatch(prefix) for prefix in prefixes):
            verdict = not keep
    return verdict


def requirement_name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", text).group(0)).lower()


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), f"{path.name}: not name==version: {line}"
            pins[requirement_name(name)] = version
    return pins


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR:-default} (and ${VAR}) with ``variables`` as the environment."""
    def one(match: re.Match[str]) -> str:
        value = variables.get(match.group(1), "")
        return value if value else (match.group(2) or "")
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", one, text)


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
    # every package folder this interpreter reads, also one a .pth added (a worktree's venv over the main one)
    dependencies = [p for p in sys.path if Path(p).name in {"site-packages", "dist-packages"}]
    (venv_site / "main_venv_dependencies.pth").write_text("\n".join(dependencies) + "\n")
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
               YOLO_BATCH_IMGSZ="64", YOLO_BATCH_BACKEND="torch", HOME=str(tmp_path),
               YOLO_CONFIG_DIR=str(tmp_path / "ultralytics"))
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
