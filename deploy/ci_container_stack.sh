#!/usr/bin/env bash
# CI's real-container smoke test (tests/deploy/test_deploy_container.py runs it):
#
#   1. starts a private Docker daemon: no bridge, no iptables, its own data root, exec
#      root, socket, pid file and config, so it touches no other Docker on the machine;
#   2. builds a Debian bookworm base image with debootstrap (python3, python3-venv) and
#      imports it as pagedserve-ci-base:bookworm, unless the daemon already has that tag
#      (the data root persists, so the base is built once per machine);
#   3. downloads what the image installs into docker/wheels (deploy/download_wheels.py;
#      only what is missing), since no index can be reached from inside the build;
#   4. builds docker/Dockerfile on that base with BuildKit and --network host, offline;
#   5. runs tokenizer, scheduler and worker from that image with docker-compose
#      (docker-compose.yml + deploy/compose.ci.yml: host network, loopback, free ports),
#      waits for all three to be healthy, and streams one Generate request through the
#      tokenizer: the text must be non-empty and end with a finish reason;
#   6. always (trap): takes the stack down, removes the pagedserve image and the build
#      cache, and stops the daemon by its PID.
#
# Exit status: 0 passed; 77 Docker cannot start here (no dockerd, no privileges, the
# daemon fails), the last line says why; anything else failed.
#
# Environment: PYTHON (a Python with grpcio and pagedserve installed; default the repo's
# .venv), PAGEDSERVE_CI_DOCKER_ROOT (data root; default /var/lib/docker-ci),
# PAGEDSERVE_CI_DEBIAN_MIRROR, PAGEDSERVE_CI_KEEP_IMAGE=1 (keep the pagedserve image).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

SKIP=77
DATA_ROOT=${PAGEDSERVE_CI_DOCKER_ROOT:-/var/lib/docker-ci}
RUN_DIR=/run/pagedserve-ci-docker           # exec root, socket, pid file (socket paths are short)
LOCK=/run/lock/pagedserve-ci-docker.lock
SOCKET=$RUN_DIR/docker.sock
PIDFILE=$RUN_DIR/dockerd.pid
BASE_IMAGE=pagedserve-ci-base:bookworm
IMAGE=pagedserve-ci:latest
PROJECT=pagedserve-ci
MIRROR=${PAGEDSERVE_CI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DAEMON_START_TIMEOUT=60
HEALTH_TIMEOUT=300
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x "$REPO/.venv/bin/python" ] && PYTHON=$REPO/.venv/bin/python
fi

export DOCKER_HOST=unix://$SOCKET
export PAGEDSERVE_CI_IMAGE=$IMAGE
# Only what this script sets reaches compose's variable substitution.
unset COMPOSE_FILE COMPOSE_PROJECT_NAME COMPOSE_PROFILES PAGEDSERVE_WORKER \
      DOCKER_CONTEXT DOCKER_CONFIG DOCKER_TLS_VERIFY DOCKER_CERT_PATH DOCKER_BUILDKIT
# docker-compose.yml with deploy/compose.ci.yml over it, as compose renders the two; the
# stack runs from that rendering less what host networking forbids (see step 5).
compose_sources=(docker-compose --project-name "$PROJECT" --project-directory "$REPO"
                 -f "$REPO/docker-compose.yml" -f "$REPO/deploy/compose.ci.yml")
SERVICES=(worker scheduler tokenizer)

started=$SECONDS
log() { printf '[container smoke %3ds] %s\n' "$((SECONDS - started))" "$*"; }
skip() { echo "container smoke test skipped: $*"; exit "$SKIP"; }
fail() { echo "container smoke test failed: $*" >&2; exit 1; }

# --- What the daemon needs: a reason to skip if it is not there ------------------------

dockerd_bin=$(command -v dockerd || true)
[ -n "$dockerd_bin" ] || [ ! -x /usr/sbin/dockerd ] || dockerd_bin=/usr/sbin/dockerd
[ -n "$dockerd_bin" ] || skip "no dockerd binary (deploy/install_ci_tools.sh installs Debian's docker.io)"
# Debian's client, the daemon's own version: another docker CLI earlier in PATH (a newer
# static one) would want buildx for BuildKit.
docker_bin=/usr/bin/docker
[ -x "$docker_bin" ] || docker_bin=$(command -v docker || true)
[ -n "$docker_bin" ] || skip "no docker client next to $dockerd_bin"
docker() { "$docker_bin" "$@"; }

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo -n true 2>/dev/null || skip "dockerd needs root, and this user ($(id -un)) has no passwordless sudo"
    sudo=(sudo -n)
fi
as_root() { "${sudo[@]}" "$@"; }

for tool in docker-compose debootstrap flock; do
    command -v "$tool" >/dev/null || fail "$tool not found: deploy/install_ci_tools.sh installs it"
done

# One run at a time on a machine: the daemon, its data root and the ports are shared.
as_root mkdir -p "$RUN_DIR" "$(dirname "$LOCK")"
as_root touch "$LOCK"
as_root chmod 666 "$LOCK"
exec 9<>"$LOCK"
flock -w 1200 9 || fail "another container smoke test holds $LOCK"

work=$(mktemp -d "${TMPDIR:-/tmp}/pagedserve-ci.XXXXXX")
dockerd_pid=""
stack_up=0

# Removes a directory that may hold a debootstrap interrupted with /proc, /sys or /dev
# mounted in it: unmounts those first, and never crosses into another file system.
remove_tree() {
    local mounts
    mounts=$(awk -v root="$1/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | sort -r)
    for mount in $mounts; do as_root umount -l "$mount" 2>/dev/null || true; done
    as_root rm -rf --one-file-system "$1"
}

dockerd_alive() { [ -n "$dockerd_pid" ] && as_root kill -0 "$dockerd_pid" 2>/dev/null; }

stop_dockerd() {
    local pid=$1 waited=0
    as_root kill -TERM "$pid" 2>/dev/null || return 0
    while as_root kill -0 "$pid" 2>/dev/null && [ $waited -lt 60 ]; do sleep 0.5; waited=$((waited + 1)); done
    if as_root kill -0 "$pid" 2>/dev/null; then
        log "dockerd $pid did not stop in 30s: SIGKILL"
        as_root kill -KILL "$pid" 2>/dev/null || true
    fi
    # Its containerd, should it outlive a killed daemon.
    local containerd_pid
    containerd_pid=$(as_root cat "$RUN_DIR/exec/containerd/containerd.pid" 2>/dev/null || true)
    if [ -n "$containerd_pid" ] && as_root kill -0 "$containerd_pid" 2>/dev/null \
            && grep -q "$RUN_DIR" "/proc/$containerd_pid/cmdline" 2>/dev/null; then
        as_root kill -TERM "$containerd_pid" 2>/dev/null || true
    fi
    # The host network namespace's handle that libnetwork leaves bind-mounted.
    as_root umount "$RUN_DIR/exec/netns/default" 2>/dev/null || true
}

# The script's own output, for the cleanup: a signal can arrive while a function's output
# is redirected (`docker ... >build.log` redirects this shell's).
exec 3>&1 4>&2
cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    exec 1>&3 2>&4
    if dockerd_alive; then
        if [ $stack_up -eq 1 ]; then
            if [ "$status" -ne 0 ]; then
                log "logs of the stack:"
                "${compose[@]}" ps
                "${compose[@]}" logs --no-color --tail 80
            fi
            log "taking the stack down"
            timeout 120 "${compose[@]}" down --remove-orphans --volumes --timeout 15 >/dev/null 2>&1
        fi
        # Whatever is left in this private daemon is ours.
        local leftover
        leftover=$(docker ps -aq)
        [ -z "$leftover" ] || docker rm -f $leftover >/dev/null
        if [ "${PAGEDSERVE_CI_KEEP_IMAGE:-0}" != 1 ]; then
            docker image rm -f "$IMAGE" >/dev/null 2>&1
            docker builder prune -af >/dev/null 2>&1
            docker image prune -f >/dev/null 2>&1
        fi
    fi
    if [ -n "$dockerd_pid" ]; then
        log "stopping dockerd (pid $dockerd_pid)"
        stop_dockerd "$dockerd_pid"
    fi
    remove_tree "$work"
    log "finished with status $status"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A daemon and work directories left by a run that was killed: the lock says no run owns
# them now.
for stale_work in "${TMPDIR:-/tmp}"/pagedserve-ci.*; do
    [ "$stale_work" = "$work" ] || [ ! -d "$stale_work" ] || remove_tree "$stale_work"
done
if stale=$(as_root cat "$PIDFILE" 2>/dev/null) && [ -n "$stale" ] && as_root kill -0 "$stale" 2>/dev/null \
        && grep -q "$DATA_ROOT" "/proc/$stale/cmdline" 2>/dev/null; then
    log "stopping a daemon left by an earlier run (pid $stale)"
    stop_dockerd "$stale"
fi

# --- 1. The daemon -----------------------------------------------------------------------

log "starting dockerd ($("$dockerd_bin" --version)), data root $DATA_ROOT"
as_root mkdir -p "$DATA_ROOT"
echo '{}' >"$work/daemon.json"
# Not through as_root (a function would run in a subshell): $! is dockerd itself, or the
# sudo that relays signals to it. setsid keeps it out of the caller's signals; the trap
# stops it. It must not inherit the lock (fd 9): a daemon outliving a killed run would hold
# it, and the next run could not stop that daemon.
"${sudo[@]}" setsid "$dockerd_bin" \
    --bridge=none --iptables=false \
    --data-root "$DATA_ROOT" --exec-root "$RUN_DIR/exec" \
    --host "unix://$SOCKET" --pidfile "$PIDFILE" --group "$(id -g)" \
    --config-file "$work/daemon.json" \
    </dev/null >"$work/dockerd.log" 2>&1 3>&- 4>&- 9>&- &
launcher=$!
deadline=$((SECONDS + DAEMON_START_TIMEOUT))
launcher_alive() { as_root kill -0 "$launcher" 2>/dev/null; }
until docker version >/dev/null 2>&1; do
    if ! launcher_alive || [ $SECONDS -ge $deadline ]; then
        why="failed to start"
        launcher_alive && why="did not answer within ${DAEMON_START_TIMEOUT}s"
        # The cleanup stops it by its PID once it has written one; before that, via sudo/setsid.
        dockerd_pid=$(as_root cat "$PIDFILE" 2>/dev/null || true)
        [ -n "$dockerd_pid" ] || { as_root kill -TERM "$launcher" 2>/dev/null || true; }
        tail -n 20 "$work/dockerd.log"
        reason=$(grep -iE "level=(fatal|error)|failed" "$work/dockerd.log" | tail -n 1 | cut -c1-300 || true)
        skip "dockerd $why: ${reason:-see its log above}"
    fi
    sleep 0.5
done
dockerd_pid=$(as_root cat "$PIDFILE")
log "dockerd is up (pid $dockerd_pid, storage driver $(docker info --format '{{.Driver}}'))"

# --- 2. The base image -------------------------------------------------------------------

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE: cached"
else
    log "base image $BASE_IMAGE: debootstrap bookworm from $MIRROR"
    rootfs=$work/rootfs
    if ! as_root debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$MIRROR" \
            >"$work/debootstrap.log" 2>&1; then
        tail -n 30 "$work/debootstrap.log"
        as_root tail -n 30 "$rootfs/debootstrap/debootstrap.log" 2>/dev/null
        fail "debootstrap failed"
    fi
    as_root sh -c "rm -rf '$rootfs'/var/cache/apt/archives/*.deb '$rootfs'/var/lib/apt/lists/*"
    as_root tar -C "$rootfs" --numeric-owner -c . \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    remove_tree "$rootfs"
    log "base image $BASE_IMAGE: imported ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
fi

# --- 3. Wheels -----------------------------------------------------------------------------

log "wheels for docker/wheels"
"$PYTHON" deploy/download_wheels.py docker/wheels 2>&1 | grep -v "^WARNING: Location" || fail "downloading the wheels failed"

# --- 4. The pagedserve image ---------------------------------------------------------------

log "building $IMAGE on $BASE_IMAGE"
if ! DOCKER_BUILDKIT=1 docker build --network host --progress plain -f docker/Dockerfile -t "$IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL= --build-arg PIP_OPTIONS=--no-index \
        . >"$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log"
    fail "docker build failed"
fi
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"

# --- 5. The stack ----------------------------------------------------------------------------

read -r tokenizer_port scheduler_port worker_port < <("$PYTHON" - <<'EOF'
import socket
sockets = [socket.socket() for _ in range(3)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
EOF
)
export PAGEDSERVE_CI_TOKENIZER_PORT=$tokenizer_port PAGEDSERVE_CI_SCHEDULER_PORT=$scheduler_port \
       PAGEDSERVE_CI_WORKER_PORT=$worker_port
# Compose 1.29 merges the override's ports into the base file's instead of replacing them,
# and its Docker client refuses published ports with host networking: the rendered file
# keeps the three services, each without `ports` and `build` (the image is built above).
"${compose_sources[@]}" config >"$work/compose.rendered.yml" || fail "docker-compose config failed"
"$PYTHON" - "$work/compose.rendered.yml" "$work/compose.yml" "${SERVICES[@]}" <<'EOF' || fail "rendering the CI stack failed"
import sys

import yaml

source, dest, *names = sys.argv[1:]
config = yaml.safe_load(open(source))
services = {name: config["services"][name] for name in names}
for service in services.values():
    assert service["network_mode"] == "host", service
    service.pop("ports", None)
    service.pop("build", None)
config["services"] = services
yaml.safe_dump(config, open(dest, "w"), sort_keys=False)
EOF
compose=(docker-compose --project-name "$PROJECT" --project-directory "$REPO" -f "$work/compose.yml")
log "starting ${SERVICES[*]} (tokenizer 127.0.0.1:$tokenizer_port)"
stack_up=1
# `up` itself waits for the scheduler to be healthy (the tokenizer depends on it).
timeout "$HEALTH_TIMEOUT" "${compose[@]}" up -d --no-build "${SERVICES[@]}" 2>&1 \
    || fail "docker-compose up failed"

deadline=$((SECONDS + HEALTH_TIMEOUT))
while :; do
    pending=()
    for service in "${SERVICES[@]}"; do
        id=$("${compose[@]}" ps -q "$service")
        [ -n "$id" ] || fail "$service has no container"
        state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
        case $state in
            "running healthy") ;;
            running*) pending+=("$service: $state") ;;
            *) fail "$service is $state" ;;
        esac
    done
    [ ${#pending[@]} -eq 0 ] && break
    [ $SECONDS -lt $deadline ] || fail "not healthy after ${HEALTH_TIMEOUT}s: ${pending[*]}"
    sleep 1
done
log "all three healthy"

log "Generate through 127.0.0.1:$tokenizer_port"
"$PYTHON" - "127.0.0.1:$tokenizer_port" <<'EOF' || fail "the Generate request failed"
import sys

import grpc

from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

request = generation_pb2.GenerateRequest(
    request_id="ci-container-smoke", prompt="The capital of France is",
    sampling=common_pb2.SamplingParams(max_tokens=16, temperature=0.0))
text, reason = [], None
with grpc.insecure_channel(sys.argv[1]) as channel:
    for response in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120):
        text.append(response.text)
        if response.finish_reason:
            reason = common_pb2.FinishReason.Name(response.finish_reason)
completion = "".join(text)
print(f"completion: {completion!r}, finish reason: {reason}")
sys.exit(0 if completion.strip() and reason else 1)
EOF

log "passed"
