#!/usr/bin/env bash
# The Docker image, built from this working tree and run the way deploy/README.md says, on a CPU box without
# an image registry (`make docker-test`; CI runs it after `make test`). Needs root.
#
#  1. Debian's docker.io, docker-compose and mmdebstrap (apt-get, when missing); a Docker engine (dockerd
#     started here with --mtu 1400 when none answers, and stopped again at the end; one already running is
#     used and left running).
#  2. The PyTorch base without a registry (deploy/local-base/build.sh), then the image (deploy/Dockerfile);
#     the build context holds only what the Dockerfile copies (.dockerignore).
#  3. A model and images made offline inside the image (deploy/smoke-model.py, --network none).
#  4. Bad starts are one line and exit code 2: the example file's placeholder token, no model file, a hot
#     folder the container cannot write.
#  5. `docker run`: /healthz, 401 without the token and 200 with it, a detection, /v1/info, /metrics, uid and
#     gid 10001, Ultralytics' config dir, (healthy) soon after /healthz first answers, a hot-folder file end
#     to end, and `docker stop` under load: queued requests answered, exit code 0.
#  6. The same through compose (deploy/compose.cpu.yaml, built by compose on the local base), listening on
#     YOLO_BATCH_PORT inside and out, then `compose stop` under load and `compose down`.
# Registries contacted: Debian's apt sources and PyPI (through the machine's own CAs), nothing else. Layers are
# cached by the engine, so a second run rebuilds only what changed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER=/usr/bin/docker  # Debian's CLI: another `docker` earlier on PATH may be another version or a wrapper
COMPOSE=/usr/bin/docker-compose
PYTHON=/usr/bin/python3  # the host's, which docker-compose depends on; the project's venv may not exist yet
export DOCKER
# docker-compose builds through the docker CLI it finds on PATH (COMPOSE_DOCKER_CLI_BUILD=1 below): Debian's, so
# that it reuses the layers `docker build` made; its own builder (docker-py) sends a context whose layers never
# match the CLI's, and would build the image a second time.
export PATH=/usr/bin:$PATH COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=0
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")
CLIENT=("$PYTHON" "$ROOT/deploy/smoke_client.py")
# deploy/README.md's variables ("Step by step"), with this run's values; the commands below are the README's.
NAME=yolo-batch-smoke  # the docker-run container, then the compose project
PORT=${SMOKE_PORT:-18080}  # not 8000: the published port must follow YOLO_BATCH_PORT
IMAGE=yolo-batch:$VERSION

started=$(date +%s)
work=""
dockerd_pid=""
compose_up=""
failed_container=""

say() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if ((rc != 0)) && [[ -n $failed_container ]]; then
        say "last log lines of $failed_container:"
        "$DOCKER" logs --tail 30 "$failed_container" 2>&1 | sed 's/^/    /' >&2
    fi
    if [[ -n $compose_up ]]; then
        "$COMPOSE" --env-file "$COMPOSE_ENV" -f deploy/compose.cpu.yaml down --remove-orphans >/dev/null 2>&1
    fi
    if [[ -n $dockerd_pid ]] || "$DOCKER" info >/dev/null 2>&1; then
        "$DOCKER" rm -f "$NAME" >/dev/null 2>&1
        "$DOCKER" rmi "$NAME-context" >/dev/null 2>&1
    fi
    if [[ -n $dockerd_pid ]]; then  # only the engine this script started
        say "stopping the dockerd this script started (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    fi
    [[ -n $work ]] && rm -rf "$work"  # after the engine: its log is in there
    if ((rc == 0)); then say "passed in $(($(date +%s) - started)) s"; else say "failed (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

phase() { say "--- $* ($(($(date +%s) - started)) s)"; }

# --- 1. packages and the engine -----------------------------------------------------------------------------------
phase "packages and the engine"
if ((EUID != 0)); then
    echo "smoke.sh: needs root (apt-get, dockerd, mmdebstrap)" >&2
    exit 2
fi
missing=()
[[ -x $DOCKER && -x /usr/sbin/dockerd ]] || missing+=(docker.io)
[[ -x $COMPOSE ]] || missing+=(docker-compose)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if ((${#missing[@]})); then
    say "installing ${missing[*]} from the apt sources"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
work=$(mktemp -d /tmp/yolo-batch-smoke.XXXXXX)
chmod 755 "$work"
if ! "$DOCKER" info >/dev/null 2>&1; then
    # No systemd here: the engine runs as a child of this script. The machine's network has MTU 1400; with
    # Docker's default of 1500 on the bridge, full-size packets from containers may be dropped on the way
    # (large downloads stall).
    /usr/sbin/dockerd --mtu 1400 >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 120); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; die "dockerd did not start"; }
    say "started dockerd (pid $dockerd_pid)"
else
    say "using the Docker engine already running"
fi
if (: <"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT is in use (SMOKE_PORT chooses another)"
fi
"$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true  # left over from an interrupted run

# --- 2. build -----------------------------------------------------------------------------------------------------
phase "the PyTorch base (deploy/local-base/build.sh)"
cd "$ROOT"
PYTORCH_IMAGE=$(deploy/local-base/build.sh | tail -n 1)
phase "the image (docker build -f deploy/Dockerfile --build-arg PYTORCH_IMAGE=$PYTORCH_IMAGE -t $IMAGE .)"
"$DOCKER" build -f deploy/Dockerfile --build-arg PYTORCH_IMAGE="$PYTORCH_IMAGE" -t "$IMAGE" . >"$work/build.log" \
    || { tail -30 "$work/build.log" >&2; die "docker build failed"; }
say "image $IMAGE: $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

phase "the build context (.dockerignore)"
printf 'FROM %s\nCOPY . /context\n' "$PYTORCH_IMAGE" | "$DOCKER" build -q -f - -t "$NAME-context" . >/dev/null
"$DOCKER" run --rm --network none --entrypoint find "$NAME-context" /context -type f >"$work/context.txt"
leaked=$(grep -E '^/context/(\.git/|\.venv/|runs/|deploy/yolo-batch\.env$|deploy/\.env$|.*\.pt$|.*__pycache__)' \
    "$work/context.txt" || true)
[[ -z $leaked ]] || die "the build context holds what it must not: $(head -3 <<<"$leaked" | tr '\n' ' ')"
grep -qx /context/pyproject.toml "$work/context.txt" || die "the build context lacks pyproject.toml"
say "  ok  $(wc -l <"$work/context.txt") files in the context; no .git, .venv, *.pt, env files, runs, caches"
"$DOCKER" rmi "$NAME-context" >/dev/null

# --- 3. a model and images, offline -------------------------------------------------------------------------------
phase "a model and images made offline in the image (deploy/smoke-model.py)"
"$DOCKER" run --rm --network none --user 0 --entrypoint python \
    -v "$ROOT/deploy/smoke-model.py:/smoke-model.py:ro" -v "$work/made:/out" "$IMAGE" /smoke-model.py /out
request_image=$work/made/images/shapes-2.jpg
[[ -s $work/made/model.pt && -s $request_image ]] || die "smoke-model.py made no model or images"

# The box, laid out as deploy/README.md says, in a temporary folder.
BOX=$work/box
MODEL=$work/made/model.pt
ENV_FILE=$work/yolo-batch.env
COMPOSE_ENV=$work/compose.env
mkdir -p "$BOX/models" "$BOX/data/in" "$BOX/data/out"
cp "$MODEL" "$BOX/models/model.pt"
chown -R 10001:10001 "$BOX/data"
cp deploy/yolo-batch.env.example "$ENV_FILE" && chmod 600 "$ENV_FILE"
sed -i "s/^YOLO_BATCH_TOKEN=.*/YOLO_BATCH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')/" "$ENV_FILE"
SMOKE_TOKEN=$(sed -n 's/^YOLO_BATCH_TOKEN=//p' "$ENV_FILE")
export SMOKE_TOKEN  # for smoke_client.py
# The smoke model is calibrated at 160 px, where a 2-core CPU answers quickly.
echo "YOLO_BATCH_IMGSZ=160" >>"$ENV_FILE"

# --- 4. bad starts: one line, exit code 2 -------------------------------------------------------------------------
phase "bad starts: one line and exit code 2"
expect_refusal() {  # WHAT EXPECTED_TEXT docker-run-arguments...
    local what=$1 expected=$2 output rc=0
    shift 2
    output=$("$DOCKER" run --rm "$@" "$IMAGE" 2>&1) || rc=$?
    if ((rc != 2)) || [[ $output != *"$expected"* ]] || [[ $output == *Traceback* ]] \
        || (($(grep -c . <<<"$output") != 1)); then
        die "$what: expected one line with '$expected' and exit code 2, got exit $rc:"$'\n'"$output"
    fi
    say "  ok  $what: exit 2, $output"
}
expect_refusal "the example env file as it is" "is the placeholder 'change-me'" \
    --env-file deploy/yolo-batch.env.example -v "$BOX/models:/models:ro"
expect_refusal "no model in the models folder" "model file not found: /models/model.pt" --env-file "$ENV_FILE" \
    -v "$work/empty-models:/models:ro"
# What Docker does with a bind-mount source that does not exist yet: creates it, as root.
expect_refusal "hot folders made by Docker (root's)" "/data/in is not writable by this process (uid 10001, gid 10001)" \
    --env-file "$ENV_FILE" -e YOLO_BATCH_WATCH=/data/in -e YOLO_BATCH_OUT=/data/out \
    -v "$BOX/models:/models:ro" -v "$work/root-owned/in:/data/in" -v "$work/root-owned/out:/data/out"

# --- 5. docker run ------------------------------------------------------------------------------------------------
check_container() {  # CONTAINER HOST_PORT PORT_INSIDE IMAGE_FOR_THE_HOT_FOLDER
    local container=$1 port=$2 inside=$3 hot_image=$4 healthz_s healthy_after ids config
    failed_container=$container
    healthz_s=$("${CLIENT[@]}" wait "http://127.0.0.1:$port/healthz" --timeout 180)
    say "  ok  /healthz answered ${healthz_s} s after the container started"
    local since=$SECONDS status=""
    while [[ $status != healthy ]]; do
        status=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$container")
        ((SECONDS - since <= 15)) || die "$container is '$status', not healthy, 15 s after /healthz answered"
        [[ $status == healthy ]] || sleep 0.5
    done
    healthy_after=$((SECONDS - since))
    say "  ok  (healthy) within ${healthy_after} s of /healthz answering (health check every 5 s)"
    "${CLIENT[@]}" check "http://127.0.0.1:$port" "$request_image" --port "$inside"
    ids=$("$DOCKER" exec "$container" sh -c 'echo "$(id -u):$(id -g)"')
    [[ $ids == 10001:10001 ]] || die "the service runs as $ids, not 10001:10001"
    say "  ok  the service runs as uid 10001, gid 10001"
    config=$("$DOCKER" exec "$container" sh -c 'cd "$YOLO_CONFIG_DIR" && find . -maxdepth 2 -type d | sort | tr "\n" " "')
    [[ $config == *"./Ultralytics "* && $config != *"Ultralytics/Ultralytics"* ]] \
        || die "Ultralytics' config dir: expected \$YOLO_CONFIG_DIR/Ultralytics, found: $config"
    say "  ok  Ultralytics keeps its settings in \$YOLO_CONFIG_DIR/Ultralytics (not .../Ultralytics/Ultralytics)"
    "${CLIENT[@]}" hotfolder "$BOX/data/in" "$BOX/data/out" "$hot_image"
}

stop_under_load() {  # CONTAINER PORT STOP_COMMAND...
    local container=$1 port=$2 code
    shift 2
    "${CLIENT[@]}" drain "http://127.0.0.1:$port" "$request_image" --container "$container" -- "$@"
    code=$("$DOCKER" inspect -f '{{.State.ExitCode}} {{.State.Status}}' "$container")
    [[ $code == "0 exited" ]] || die "after the stop: expected exit code 0, got '$code'"
    local log
    log=$("$DOCKER" logs "$container" 2>&1)  # whole, not piped: grep -q would end the pipe early (pipefail)
    [[ $log == *"shutting down: no new work"* ]] || die "no drain in the log"
    [[ $log != *"not reached within the grace period"* ]] || die "queued images were dropped at the stop"
    [[ $log != *Traceback* ]] || die "a traceback in the log"
    say "  ok  exit code 0 after the drain; no traceback in the log"
    failed_container=""
}

phase "docker run (port $PORT)"
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" --env-file "$ENV_FILE" \
    -e YOLO_BATCH_WATCH=/data/in -e YOLO_BATCH_OUT=/data/out \
    -v "$BOX/models:/models:ro" -v "$BOX/data/in:/data/in" -v "$BOX/data/out:/data/out" "$IMAGE" >/dev/null
check_container "$NAME" "$PORT" 8000 "$work/made/images/shapes-0.jpg"
stop_under_load "$NAME" "$PORT" "$DOCKER" stop -t 45 "$NAME"
"$DOCKER" rm "$NAME" >/dev/null

# --- 6. compose (the CPU variant) ---------------------------------------------------------------------------------
phase "compose: deploy/compose.cpu.yaml (port $PORT inside and out)"
cat >"$COMPOSE_ENV" <<ENV
COMPOSE_PROJECT_NAME=$NAME
YOLO_BATCH_VERSION=${IMAGE#*:}
YOLO_BATCH_PYTORCH_IMAGE=$PYTORCH_IMAGE
YOLO_BATCH_ENV_FILE=$(realpath "$ENV_FILE")
YOLO_BATCH_MODEL_FILE=model.pt
YOLO_BATCH_MODELS_DIR=$BOX/models
YOLO_BATCH_IN_DIR=$BOX/data/in
YOLO_BATCH_RESULTS_DIR=$BOX/data/out
YOLO_BATCH_PUBLISH=127.0.0.1
YOLO_BATCH_PORT=$PORT
ENV
compose_up=yes
COMPOSE_DOCKER_CLI_BUILD=1 "$COMPOSE" --env-file "$COMPOSE_ENV" -f deploy/compose.cpu.yaml up -d --build >"$work/up.log" 2>&1 \
    || { tail -30 "$work/up.log" >&2; die "compose up failed"; }
"$COMPOSE" --env-file "$COMPOSE_ENV" -f deploy/compose.cpu.yaml ps >&2
container=$("$COMPOSE" --env-file "$COMPOSE_ENV" -f deploy/compose.cpu.yaml ps -q yolo-batch)
[[ -n $container ]] || die "compose started no container"
check_container "$container" "$PORT" "$PORT" "$work/made/images/shapes-3.jpg"
stop_under_load "$container" "$PORT" "$COMPOSE" --env-file "$COMPOSE_ENV" -f deploy/compose.cpu.yaml stop
"$COMPOSE" --env-file "$COMPOSE_ENV" -f deploy/compose.cpu.yaml down >/dev/null 2>&1
compose_up=""
