# Entry points for a fresh machine: `make demo` and `make test` (both create .venv and install), and
# `make docker-test` (as root: builds and runs the Docker image, see deploy/README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test gpu-check docker-test install install-dev clean

# setuptools: the build backend pyproject.toml names (>=77); a new venv brings 65, which cannot build the wheel
# without build isolation (tests/test_serving_deploy.py does that, offline).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"

# The first ten minutes: generate the built-in big-shapes set, AutoBatch + train yolo11n from scratch until it
# detects (12 epochs at imgsz 128), then `infer --batch auto --save-annotated` on its validation images, and
# print where to look. `yolo-batch demo` is the same for anyone with the package installed.
demo: install
	$(BIN)/yolo-batch demo

# Lint and type-check first (seconds), then the suite.
test: install-dev
	$(BIN)/ruff check yolo_batch datasets tests deploy
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# On a GPU box, at most 8 minutes: pytest -m gpu, then bench autobatch (also --shared-gpu), bench infer and
# bench serve, into runs/gpu-check/report.json and report.md. Without a GPU: one line, exit 0.
gpu-check: install-dev
	$(BIN)/python -m yolo_batch.gpu_check --out runs/gpu-check

# The Docker image built from this tree and run as deploy/README.md says (CPU, no registry needed; root; minutes).
docker-test:
	deploy/smoke.sh

clean:
	rm -rf $(VENV) runs *.egg-info
